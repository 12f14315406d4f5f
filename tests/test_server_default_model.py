"""End to end on the real default model: `conveyor serve` with no --model, the official openai client."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.server_utils import RunningServer, running_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("default_server") / "server.log"
    with running_server("--kv-cache-memory", "512MiB", log_path=str(log)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")


def test_completion_streamed_equals_non_streamed(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    assert model == "gemma-3-270m-q4_k_m"
    args = dict(model=model, prompt="The capital of France is", max_tokens=20, temperature=0.0)
    whole = client.completions.create(**args)
    streamed = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text
    assert whole.usage.prompt_tokens == 6  # <bos> The capital of France is
    assert whole.usage.completion_tokens == streamed[-1].usage.completion_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.choices[0].text.strip()


def test_chat_streamed_equals_non_streamed(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Name three colors."}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0.0)
    stream = list(client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0.0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == whole.choices[0].message.content
    assert whole.choices[0].message.content.strip()
    assert whole.choices[0].finish_reason == stream[-1].choices[0].finish_reason
    # Gemma's turn format: the prompt ends with the model's turn opening.
    assert whole.usage.prompt_tokens > 10
