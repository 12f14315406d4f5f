"""`conveyor serve | generate | bench | tune`: the command line. This module only dispatches to the subcommands,
each of which registers its own flags; nothing imports it."""

from __future__ import annotations

import argparse
import logging
import sys

from conveyor.bench.cli import register as register_bench
from conveyor.generate import register as register_generate
from conveyor.server.cli import register as register_serve
from conveyor.tune.cli import register as register_tune


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    register_generate(sub)
    register_serve(sub)
    register_bench(sub)
    register_tune(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # NOTE: httpx logs every request at INFO; a benchmark client sends hundreds of them.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    if getattr(args, "ray", False):  # `conveyor serve --ray`: the Serve application above the server layer
        from conveyor.distributed.cli import serve_ray

        return serve_ray(args)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
