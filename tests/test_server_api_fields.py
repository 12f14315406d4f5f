"""Every request field is served or refused by name: a real `conveyor serve` on a tiny model, driven by the
official openai client (httpx where the client has no call: preflights, raw event lines)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conveyor.server.protocol import NOT_YET_SUPPORTED, UNSUPPORTED
from conveyor.server.serving import KEEPALIVE, merge_streams
from tests.server_utils import RunningServer, running_server

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPT_IDS = [1, 40, 41, 42, 43, 44, 45]
MESSAGES = [{"role": "user", "content": "hi there"}]


def _serve(model_dir: Path, tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    template = tmp_path / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    # fp32: some tests compare a request's logprobs with a repeat's (bf16 differs by shape, prefix hit or not)
    return running_server("--model", str(model_dir), "--block-size", "4", "--num-kv-blocks", "2048",
                          "--dtype", "float32", "--chat-template", str(template), "--max-model-len", "256", *extra,
                          log_path=str(tmp_path / "server.log"))


@pytest.fixture(scope="module")
def server(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with _serve(tiny_model_dirs["gemma3"], tmp_path_factory.mktemp("fields"), "--sse-keepalive", "0.002") as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _chat(client: openai.OpenAI, model: str, **args: Any) -> Any:
    return client.chat.completions.create(model=model, messages=MESSAGES, **args)


# ---- refused fields ---------------------------------------------------------------------------

REFUSED = sorted(set(NOT_YET_SUPPORTED) | set(UNSUPPORTED))
SAMPLE_VALUES: dict[str, Any] = {
    "response_format": {"type": "json_object"}, "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "required", "parallel_tool_calls": True, "chat_template_kwargs": {"enable_thinking": True},
    "continue_final_message": True, "store": True, "service_tier": "flex", "modalities": ["text", "audio"],
    "suffix": "and then", "guided_choice": ["a", "b"], "structured_outputs": {"choice": ["a"]},
}


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("name", REFUSED + ["no_such_field"])
def test_every_unserved_field_gets_a_400_naming_it_and_the_server_goes_on(
        client: openai.OpenAI, model: str, endpoint: str, name: str) -> None:
    value = SAMPLE_VALUES.get(name, "x")
    with pytest.raises(openai.BadRequestError) as refused:
        if endpoint == "chat":
            _chat(client, model, max_tokens=1, extra_body={name: value})
        else:
            client.completions.create(model=model, prompt="hi", max_tokens=1, extra_body={name: value})
    error = refused.value.body
    assert error["param"] == name and name in error["message"] and error["code"] == 400, error
    served = client.completions.create(model=model, prompt="hi", max_tokens=1)
    assert served.usage.completion_tokens == 1


def test_null_or_neutral_values_of_unserved_fields_are_accepted(client: openai.OpenAI, model: str) -> None:
    nulls = {name: None for name in REFUSED}
    assert _chat(client, model, max_tokens=2, extra_body={**nulls, "store": False, "service_tier": "auto"}
                 ).choices[0].message.content is not None
    assert client.completions.create(model=model, prompt="hi", max_tokens=2, extra_body={"suffix": None})


@pytest.mark.parametrize(("body", "param"), [
    ({"stream_options": {"include_usage": True, "nope": 1}, "stream": True}, "stream_options.nope"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 150}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"logit_bias": {"-3": 1}}, "logit_bias"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
])
def test_bad_values_of_served_fields_name_the_field(server: RunningServer, model: str, body: dict, param: str) -> None:
    response = httpx.post(f"{server.base_url}/v1/chat/completions",
                          json={"model": model, "messages": MESSAGES, "max_tokens": 2, **body})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_best_of_below_n_or_streamed_is_refused(client: openai.OpenAI, model: str) -> None:
    for args in (dict(n=3, best_of=2), dict(n=1, best_of=2, stream=True)):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=model, prompt="hi", max_tokens=2, **args)
        assert refused.value.body["param"] == "best_of"


# ---- served fields ----------------------------------------------------------------------------

def test_logit_bias_steers_both_endpoints_streamed_and_not(client: openai.OpenAI, model: str) -> None:
    forced = {"77": 100}
    args: dict[str, Any] = dict(model=model, max_tokens=4, temperature=0.0, logit_bias=forced, logprobs=0,
                                extra_body={"ignore_eos": True})
    whole = client.completions.create(prompt=PROMPT_IDS, **args)
    streamed = list(client.completions.create(prompt=PROMPT_IDS, stream=True, **args))
    tokens = whole.choices[0].logprobs.tokens
    assert len(tokens) == 4 and len(set(tokens)) == 1  # token 77 every time
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    chat = _chat(client, model, max_tokens=3, temperature=0.0, logit_bias=forced, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == tokens[0] * 3
    chunks = list(_chat(client, model, max_tokens=3, temperature=0.0, logit_bias=forced, stream=True,
                        extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == tokens[0] * 3
    plain = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=1, temperature=0.0, logprobs=0)
    first = plain.choices[0].logprobs.tokens[0]
    banned = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=1, temperature=0.0, logprobs=0,
                                       logit_bias={str(_token_id(client, first)): -100})
    assert banned.choices[0].logprobs.tokens[0] != first


def _token_id(client: openai.OpenAI, text: str) -> int:
    base = str(client.base_url).removesuffix("/v1/")
    return httpx.post(f"{base}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"][0]


def test_best_of_returns_the_best_of_the_samples(client: openai.OpenAI, model: str) -> None:
    args: dict[str, Any] = dict(model=model, prompt=PROMPT_IDS, max_tokens=5, temperature=1.0, seed=5,
                                extra_body={"ignore_eos": True})
    every = client.completions.create(n=4, logprobs=0, **args)
    totals = sorted((sum(c.logprobs.token_logprobs), c.text) for c in every.choices)
    best = client.completions.create(n=2, best_of=4, **args)
    assert [c.text for c in best.choices] == [text for _, text in totals[::-1][:2]]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == 4 * 5  # every sample generated is counted


def test_max_completion_tokens_n_stop_reason_and_fingerprint_in_chat(client: openai.OpenAI, model: str) -> None:
    args: dict[str, Any] = dict(temperature=1.0, seed=9, n=3, max_completion_tokens=6, extra_body={"ignore_eos": True})
    whole = _chat(client, model, **args)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert whole.usage.completion_tokens == 18 and whole.system_fingerprint.startswith("fp_")
    chunks = list(_chat(client, model, stream=True, **args))
    for choice in whole.choices:
        text = "".join(c.choices[0].delta.content or "" for c in chunks
                       if c.choices and c.choices[0].index == choice.index)
        assert text == choice.message.content
    assert {c.system_fingerprint for c in chunks} == {whole.system_fingerprint}
    stop = whole.choices[0].message.content[2:4]
    stopped = _chat(client, model, temperature=1.0, seed=9, max_completion_tokens=6, stop=[stop],
                    extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].stop_reason == stop
    streamed = list(_chat(client, model, temperature=1.0, seed=9, max_completion_tokens=6, stop=[stop], stream=True,
                          extra_body={"ignore_eos": True}))
    assert streamed[-1].choices[0].stop_reason == stop
    plain = client.completions.create(model=model, prompt="hi", max_tokens=1)
    assert plain.system_fingerprint == whole.system_fingerprint


def test_continuous_usage_stats_on_every_chunk(client: openai.OpenAI, model: str) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    chat = list(_chat(client, model, max_tokens=5, stream=True, stream_options=options,
                      extra_body={"ignore_eos": True}))
    completion = list(client.completions.create(model=model, prompt="hi", max_tokens=5, stream=True,
                                                stream_options=options, extra_body={"ignore_eos": True}))
    for chunks in (chat, completion):
        counts = [c.usage.completion_tokens for c in chunks]
        assert all(c.usage is not None for c in chunks) and counts == sorted(counts) and counts[-1] == 5
        assert chunks[-1].choices == [] and chunks[0].usage.prompt_tokens == chunks[-1].usage.prompt_tokens


@pytest.mark.parametrize("stop", [["zzzzzzzzzz"], None], ids=["held back for a stop string", "no stop"])
def test_streamed_chat_logprobs_reach_the_client_once_per_token(client: openai.OpenAI, model: str,
                                                                stop: list[str] | None) -> None:
    args: dict[str, Any] = dict(max_tokens=20, temperature=0.0, logprobs=True, top_logprobs=2, stop=stop,
                                extra_body={"ignore_eos": True})
    whole = _chat(client, model, **args)
    chunks = list(_chat(client, model, stream=True, **args))
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs
                for entry in c.choices[0].logprobs.content]
    assert len(streamed) == 20
    expected = whole.choices[0].logprobs.content
    assert [e.token for e in streamed] == [e.token for e in expected]
    # NOTE: close, not equal: the second request's prompt may come from the prefix cache (other matmul shapes),
    # and the tiny random model's logits amplify that (up to 0.025 seen in fp32); a logprob sent for the
    # wrong token or twice would be off by far more, and the tokens are compared above.
    drift = max(abs(a.logprob - b.logprob) for a, b in zip(streamed, expected))
    assert drift < 0.1, drift


def test_echo_with_logprobs_scores_the_prompt_streamed_and_not(client: openai.OpenAI, model: str) -> None:
    args: dict[str, Any] = dict(model=model, prompt=PROMPT_IDS, max_tokens=3, temperature=0.0, logprobs=2,
                                echo=True, extra_body={"ignore_eos": True})
    whole = client.completions.create(**args).choices[0].logprobs
    assert len(whole.tokens) == len(PROMPT_IDS) + 3
    assert whole.token_logprobs[0] is None and whole.top_logprobs[0] is None
    assert all(lp <= 0 for lp in whole.token_logprobs[1:]) and len(whole.top_logprobs[1]) >= 2
    streamed = [c.choices[0].logprobs for c in client.completions.create(stream=True, **args)]
    assert sum((s.token_logprobs for s in streamed), []) == whole.token_logprobs
    # The prompt's last token scored as a prompt token equals its score when generated after the rest.
    generated = client.completions.create(model=model, prompt=PROMPT_IDS[:-1], max_tokens=1, temperature=0.0,
                                          logprobs=20, logit_bias={str(PROMPT_IDS[-1]): 0})
    top = generated.choices[0].logprobs.top_logprobs[0]
    last_text = whole.tokens[len(PROMPT_IDS) - 1]
    if last_text in top:
        assert abs(top[last_text] - whole.token_logprobs[len(PROMPT_IDS) - 1]) < 1e-4


def test_keepalive_comments_do_not_disturb_the_client(server: RunningServer, client: openai.OpenAI,
                                                      model: str) -> None:
    args: dict[str, Any] = dict(model=model, prompt=[1] + [40] * 200, max_tokens=4, temperature=0.0,
                                extra_body={"ignore_eos": True})
    whole = client.completions.create(**args)
    assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **args)) == whole.choices[0].text


def test_keepalive_fills_silences_and_ends_with_the_streams() -> None:
    closed: list[bool] = []

    async def slow() -> AsyncIterator[Any]:
        try:
            yield "first"
            await asyncio.sleep(0.13)
            yield "second"
            await asyncio.sleep(10)
            yield "never"
        finally:
            closed.append(True)

    async def main() -> list[Any]:
        seen = []
        merged = merge_streams([slow()], keepalive=0.05)
        async for _, item in merged:
            seen.append(item)
            if item == "second":
                break
        await merged.aclose()  # type: ignore[attr-defined]
        return seen

    seen = asyncio.run(main())
    assert seen == ["first", KEEPALIVE, KEEPALIVE, "second"] and closed == [True]


# ---- CORS and sampling defaults: servers of their own -------------------------------------------

def test_cors_is_off_by_default_and_answers_preflights_when_on(tiny_model_dirs: dict[str, Path],
                                                               tmp_path: Path, server: RunningServer) -> None:
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    off = httpx.options(f"{server.base_url}/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in off.headers
    with _serve(tiny_model_dirs["gemma3"], tmp_path, "--allowed-origins", "http://ui.example",
                "--api-key", "sekrit") as cors:
        answer = httpx.options(f"{cors.base_url}/v1/chat/completions", headers=preflight)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "http://ui.example"
        assert "POST" in answer.headers["access-control-allow-methods"]
        other = httpx.options(f"{cors.base_url}/v1/chat/completions",
                              headers={**preflight, "Origin": "http://evil.example"})
        assert other.status_code == 400
        served = httpx.post(f"{cors.base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                            headers={"Origin": "http://ui.example", "Authorization": "Bearer sekrit"})
        assert served.status_code == 200 and served.headers["access-control-allow-origin"] == "http://ui.example"
        assert "x-request-id" in served.headers["access-control-expose-headers"].lower()


def test_generation_config_defaults_fill_unset_fields(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["gemma3"], model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"top_k": 1, "max_new_tokens": 3}))
    for flags, expect_defaults in (((), True), (("--generation-config", "vllm"), False)):
        with _serve(model_dir, tmp_path, *flags) as running:
            client = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="unused", max_retries=0)
            name = client.models.list().data[0].id
            greedy = client.completions.create(model=name, prompt=PROMPT_IDS, max_tokens=3, temperature=0.0,
                                               extra_body={"ignore_eos": True}).choices[0].text
            sampled = {client.completions.create(model=name, prompt=PROMPT_IDS, temperature=1.0, seed=seed,
                                                 extra_body={"ignore_eos": True}).choices[0].text
                       for seed in range(4)}
            overridden = {client.completions.create(model=name, prompt=PROMPT_IDS, max_tokens=3, temperature=1.0,
                                                    seed=seed, extra_body={"ignore_eos": True, "top_k": -1}
                                                    ).choices[0].text for seed in range(4)} \
                if expect_defaults else set()
            if expect_defaults:  # top_k 1 makes sampling greedy; max_new_tokens 3 replaces the default 16
                assert sampled == {greedy} and len(overridden) > 1
            else:
                assert len(sampled) > 1 and all(len(text) > len(greedy) for text in sampled)
