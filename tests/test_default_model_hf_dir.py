"""The default model as a Hugging Face directory written by transformers itself (issue 17): conveyor must
tokenize it, generate from it and serve it exactly as transformers does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from conveyor import LLM, SamplingParams
from conveyor.cache import atomic_write_path, cache_dir, file_fingerprint
from conveyor.model.loader import default_model_path
from conveyor.tokenizer import GEMMA_CHAT_TEMPLATE, load_tokenizer
from tests.server_utils import RunningServer, running_server
from tests.tokenizer_parity import assert_same_ids_as_transformers

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
MAX_TOKENS = 16
MESSAGES = [{"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Capital of Italy?"}]


@pytest.fixture(scope="module")
def hf_dir() -> Path:
    """transformers' own conversion of the default GGUF, saved with its tokenizer as a new user would.
    The GGUF load takes about a minute, so the directory is built once and cached."""
    import transformers

    gguf = Path(default_model_path())
    target = cache_dir() / "test-hf-dirs" / file_fingerprint(gguf, salt=f"hf dir {transformers.__version__}")
    if target.exists():
        return target
    partial = atomic_write_path(target)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32)
    # The weights are dequantized to fp32 on load; without the GGUF marker save_pretrained writes them.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(target)
    return target


@pytest.fixture(scope="module")
def reference(hf_dir: Path) -> dict[str, Any]:
    """transformers on the directory: prompt ids, greedy continuation, chat ids with Gemma's template
    (the directory has none; conveyor falls back to it)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_TOKENS,
                                min_new_tokens=MAX_TOKENS, do_sample=False)
    completion = output[0, len(prompt_ids):].tolist()
    chat_ids = tokenizer.apply_chat_template(MESSAGES, chat_template=GEMMA_CHAT_TEMPLATE, tokenize=True,
                                             add_generation_prompt=True, return_dict=True)["input_ids"]
    return {"prompt_ids": prompt_ids, "completion": completion, "chat_ids": chat_ids,
            "text": tokenizer.decode(completion, skip_special_tokens=True)}


def test_ids_equal_transformers(hf_dir: Path, reference: dict[str, Any]) -> None:
    ours = load_tokenizer(str(hf_dir))
    assert_same_ids_as_transformers(ours, hf_dir)
    assert reference["prompt_ids"][0] == 2  # <bos>: the symptom was its absence
    assert ours.encode_chat(MESSAGES) == reference["chat_ids"]
    assert reference["chat_ids"].count(2) == 1


def test_greedy_generation_equals_transformers(hf_dir: Path, reference: dict[str, Any]) -> None:
    llm = LLM(model=str(hf_dir), dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    output = llm.generate(PROMPT, params)[0]
    assert output.prompt_token_ids == reference["prompt_ids"]
    assert list(output.outputs[0].token_ids) == reference["completion"]
    assert output.outputs[0].text == reference["text"]


@pytest.fixture(scope="module")
def server(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("hf_dir_server") / "server.log"
    with running_server("--model", str(hf_dir), "--kv-cache-memory", "512MiB", "--dtype", "float32",
                        log_path=str(log)) as running:
        yield running


def test_served_through_openai_client_as_transformers(server: RunningServer,
                                                      reference: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0,
                                           extra_body={"ignore_eos": True})
    assert completion.usage.prompt_tokens == len(reference["prompt_ids"])
    assert completion.choices[0].text == reference["text"]

    tokenized = httpx.post(f"{server.base_url}/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert tokenized == reference["chat_ids"]  # the ids a chat completion runs, one BOS
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0.0)
    assert chat.usage.prompt_tokens == len(reference["chat_ids"])
    assert chat.choices[0].message.content.strip()
