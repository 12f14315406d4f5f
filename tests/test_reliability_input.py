"""Careless and hostile input against a real `conveyor serve` (tiny model, an API key set): every bad value
of every field gets a 4xx OpenAI error object naming the problem, and nothing else is disturbed."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server_utils import RunningServer, metric, running_server

pytestmark = pytest.mark.reliability

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# The test template, plus a refusal like real templates have (Gemma's raises on roles out of order).
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'tool' and not m['content'] %}"
                 "{{ raise_exception('a tool message needs content') }}{% endif %}"
                 "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
LONE = "hi \ud800"  # valid JSON (escaped), not valid Unicode text


@pytest.fixture(scope="module")
def server(tiny_model_dirs: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("input_server")
    (directory / "template.jinja").write_text(CHAT_TEMPLATE)
    with running_server("--model", str(tiny_model_dirs["gemma3"]), "--block-size", "4",
                        "--num-kv-blocks", "1024", "--chat-template", str(directory / "template.jinja"),
                        "--max-model-len", "256",
                        "--api-key", KEY, log_path=str(directory / "server.log")) as running:
        yield running


def _post(server: RunningServer, path: str, body: Any, headers: dict[str, str] = AUTH) -> httpx.Response:
    # json.dumps escapes lone surrogates (\ud800) as a hostile client would send them
    return httpx.post(f"{server.base_url}{path}", content=json.dumps(body).encode(),
                      headers={**headers, "content-type": "application/json"}, timeout=60)


def _assert_error(response: httpx.Response, status: int, needle: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and isinstance(error["type"], str)
    assert needle in f"{error['message']} {error['param']}", error


MESSAGES = [{"role": "user", "content": "hi"}]
# (endpoint, body, status, a word the message or param must hold): every field, every way to get it wrong
BAD_INPUT = [
    ("/v1/completions", {"prompt": "x", "model": "nope"}, 404, "nope"),
    ("/v1/completions", {"prompt": "x", "model": LONE}, 400, "model"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": LONE}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["ok", LONE]}, 400, "prompt.1"),
    ("/v1/completions", {"prompt": ""}, 400, "empty"),
    ("/v1/completions", {"prompt": []}, 400, "empty"),
    ("/v1/completions", {"prompt": [[1], []]}, 400, "empty"),
    ("/v1/completions", {"prompt": {"text": "x"}}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**6]}, 400, "token ids"),
    ("/v1/completions", {"prompt": [1, -5]}, 400, "token ids"),
    ("/v1/completions", {"prompt": [1, 10**30]}, 400, "token ids"),
    ("/v1/completions", {"prompt": [1] * 200, "max_tokens": 100}, 400, "300"),
    ("/v1/completions", {"prompt": ["x"] * 40, "n": 16}, 400, "640"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**30}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "min_p": 2}, 400, "min_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": 17}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stop": LONE}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": ["a"]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, 400, "seed must be a 64-bit integer"),
    ("/v1/completions", {"prompt": "x", "seed": "s"}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "ignore_eos": "maybe"}, 400, "ignore_eos"),
    ("/v1/completions", {"prompt": "x", "min_tokens": -1}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 20, "max_tokens": 5}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "stream": "yes please"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": "x"}}, 400, "include_usage"),
    ("/v1/completions", {"prompt": "x", "echo": "x"}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "user": LONE}, 400, "user"),
    ("/v1/completions", {"prompt": "x", LONE: 1}, 400, "\\ud800"),
    ("/v1/completions", ["x"], 400, "dict"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONE}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
     400, "messages.0.content.0.text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": []}]}, 400, "must answer the tool_calls"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": "x"}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 10**6}, 400, "max_model_len"),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 17}, 400, "n"),
    ("/v1/chat/completions", {"messages": MESSAGES, "model": "nope"}, 404, "nope"),
    ("/tokenize", {"prompt": LONE}, 400, "prompt"),
    ("/tokenize", {}, 400, "exactly one"),
    ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400, "exactly one"),
    ("/tokenize", {"messages": [{"content": [], "role": "tool"}]}, 400, "chat template"),
    ("/tokenize", {"messages": [{"role": "user", "content": LONE}]}, 400, "messages.0.content"),
    ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "nope"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": [10**6]}, 400, "tokens"),
    ("/detokenize", {"tokens": [10**30]}, 400, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens"),
    ("/detokenize", {"tokens": [1], "model": LONE}, 400, "model"),
]


@pytest.mark.parametrize(("path", "body", "status", "needle"), BAD_INPUT,
                         ids=[f"{p}-{json.dumps(b)[:60]}" for p, b, _, _ in BAD_INPUT])
def test_bad_input_gets_a_clear_4xx_and_disturbs_nothing(server: RunningServer, path: str, body: Any,
                                                          status: int, needle: str) -> None:
    _assert_error(_post(server, path, body), status, needle)
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_after_all_the_bad_input_the_server_still_serves(server: RunningServer) -> None:
    for path, body, _, _ in BAD_INPUT:  # once more, streamed where it makes sense
        if isinstance(body, dict) and "v1" in path:
            assert _post(server, path, {**body, "stream": True}).status_code < 500
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY)
    result = client.completions.create(model=client.models.list().data[0].id, prompt="hello", max_tokens=4)
    assert result.usage.completion_tokens >= 1
    assert metric(server.base_url, "conveyor:num_requests_running", AUTH) == 0
    assert metric(server.base_url, "conveyor:kv_cache_usage_perc", AUTH) == 0


def _raw(server: RunningServer, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(request)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
        return received


def test_errors_outside_the_routes_are_error_objects_too(server: RunningServer) -> None:
    def body_of(raw: bytes) -> dict[str, Any]:
        return json.loads(raw.split(b"\r\n\r\n", 1)[1])

    _assert_error(httpx.get(f"{server.base_url}/no/such/path", headers=AUTH), 404, "Not Found")
    _assert_error(httpx.delete(f"{server.base_url}/v1/models", headers=AUTH), 405, "Method Not Allowed")
    for bad_body in (b'{"prompt": "\xff\xfe"}', b"[" * 100_000 + b"]" * 100_000, b"{not json"):
        response = httpx.post(f"{server.base_url}/v1/completions", content=bad_body,
                              headers={**AUTH, "content-type": "application/json"})
        _assert_error(response, 400, "")
    six_megabytes = iter([b"x" * 65536] * 96)  # a generator body: sent chunked, with no Content-Length
    chunked = httpx.post(f"{server.base_url}/v1/completions", content=six_megabytes,
                         headers={**AUTH, "content-type": "application/json"})
    _assert_error(chunked, 413, "limit")
    declared = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    + KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 99999999\r\n\r\n")
    assert b" 413 " in declared.split(b"\r\n")[0] and body_of(declared)["error"]["code"] == 413
    assert httpx.get(f"{server.base_url}/health").status_code == 200


POSTED = ["/tokenize", "/detokenize", "/v1/completions", "/v1/chat/completions"]


@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/docs", "/redoc", "/openapi.json",
                                  "/no/such/path", *POSTED])
def test_every_route_but_health_needs_the_bearer_key(server: RunningServer, path: str) -> None:
    for headers in ({}, {"Authorization": KEY}, {"Authorization": "Bearer wrong"},
                    {"Authorization": "Basic " + KEY}):
        method = "POST" if path in POSTED else "GET"
        response = httpx.request(method, f"{server.base_url}{path}", headers=headers, json={})
        _assert_error(response, 401, "API key")
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    lower_case_scheme = {"Authorization": f"bearer {KEY}"}
    assert httpx.get(f"{server.base_url}/v1/models", headers=lower_case_scheme).status_code == 200


def test_every_response_carries_a_request_id(server: RunningServer) -> None:
    ok = httpx.get(f"{server.base_url}/v1/models", headers=AUTH)
    refused = httpx.get(f"{server.base_url}/v1/models")
    ids = {ok.headers["x-request-id"], refused.headers["x-request-id"]}
    assert len(ids) == 2 and all(i.startswith("req-") for i in ids)


def test_the_openapi_document_lists_the_real_statuses_and_the_error_schema(server: RunningServer) -> None:
    document = httpx.get(f"{server.base_url}/openapi.json", headers=AUTH).json()
    completions = document["paths"]["/v1/completions"]["post"]["responses"]
    assert set(completions) == {"200", "400", "401", "404", "408", "413", "429", "500", "503"}
    assert completions["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert not any("422" in operation["responses"] for path in document["paths"].values()
                   for operation in path.values())
    assert set(document["components"]["schemas"]["ErrorDetail"]["properties"]) == {"message", "type", "param",
                                                                                    "code"}


def test_public_metrics_opens_metrics_and_nothing_else(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with running_server("--model", str(tiny_model_dirs["llama"]), "--num-kv-blocks", "256", "--api-key", KEY,
                        "--public-metrics", log_path=str(tmp_path / "server.log")) as scraped:
        assert "conveyor:num_requests_running" in httpx.get(f"{scraped.base_url}/metrics").text
        _assert_error(httpx.get(f"{scraped.base_url}/v1/models"), 401, "API key")
        _assert_error(httpx.get(f"{scraped.base_url}/openapi.json"), 401, "API key")
