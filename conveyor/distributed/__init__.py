"""conveyor on Ray Serve: engine replicas (`replica.py`), the prefix-aware router (`router.py`), the
ingress serving the same API over them (`ingress.py`) and the application (`app.py`). Needs `ray[serve]`
(the `ray` extra); nothing below this package imports it."""
