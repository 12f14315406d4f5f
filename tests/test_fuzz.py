"""A schema fuzzer over the server's own OpenAPI document (schemathesis, on a tiny model): data that fits
the schema and data that does not, for every operation. No 5xx is allowed, every status must be one the
document lists, and every error must be an OpenAI error object. Bounded: a fixed number of examples."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck
from schemathesis import GenerationMode

from tests.server_utils import RunningServer, metric, running_server

pytestmark = pytest.mark.reliability

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES_PER_OPERATION_AND_MODE = 100
UNENDING_STREAMS = {"/v1/engine/steps"}  # the dashboard's step stream


@pytest.fixture(scope="module")
def server(tiny_model_dirs: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("fuzz_server")
    # The per-request cap is lowered so that the largest request the schema allows stays quick here.
    with running_server("--model", str(tiny_model_dirs["gemma3"]), "--block-size", "4",
                        "--num-kv-blocks", "2048", "--max-model-len", "128",
                        "--max-choices-per-request", "8", "--api-key", KEY,
                        log_path=str(directory / "server.log")) as running:
        yield running


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzing_the_openapi_document_finds_no_5xx(server: RunningServer, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json", headers=AUTH)
    statuses: Counter[tuple[str, int]] = Counter()
    session = requests.Session()

    @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION_AND_MODE, deadline=None, database=None,
                         derandomize=True, suppress_health_check=list(HealthCheck))
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call(base_url=server.base_url, session=session, headers=AUTH, timeout=60)
        statuses[(case.operation.label, response.status_code)] += 1
        assert response.status_code < 500, (case.body, response.text)
        assert str(response.status_code) in case.operation.definition.raw["responses"], response.text
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["code"] == response.status_code and error["message"], error

    for result in schema.get_all_operations():
        operation = result.ok()
        if mode == GenerationMode.NEGATIVE and not list(operation.body):
            continue  # no body (the GETs, /reset_prefix_cache): nothing to get wrong
        if operation.path in UNENDING_STREAMS:
            continue  # it never ends, so a fuzzer would wait forever; tests/test_dashboard.py covers it
        hypothesis.given(case=operation.as_strategy(generation_mode=mode))(fuzz)()
    operations = {label for label, _ in statuses}
    assert len(operations) == (4 if mode == GenerationMode.NEGATIVE else 9), statuses
    if mode == GenerationMode.NEGATIVE:
        assert any(status == 400 for _, status in statuses), statuses
    assert metric(server.base_url, "conveyor:num_requests_running", AUTH) == 0
    assert requests.get(f"{server.base_url}/health", timeout=5).status_code == 200
