"""Real vocabularies: llama.cpp's `models/ggml-vocab-*.gguf` (tokenizer metadata of the real models, with
llama.cpp's own test texts in `*.gguf.inp`). They are not in this repository; point
CONVEYOR_GGUF_VOCAB_DIR at a llama.cpp checkout's `models/` directory to run these (docs/serving.md has
the last results)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conveyor.tokenizer import load_tokenizer
from tests.tokenizer_parity import CORPUS

VOCAB_DIR = os.environ.get("CONVEYOR_GGUF_VOCAB_DIR")
# The vocabularies of the families conveyor runs, and byte-level ones with other splits.
VOCABS = ["llama-bpe", "llama-spm", "qwen2", "qwen35", "gpt-2", "deepseek-llm", "deepseek-coder", "falcon",
          "starcoder"]


@pytest.mark.skipif(VOCAB_DIR is None, reason="set CONVEYOR_GGUF_VOCAB_DIR to llama.cpp's models/ directory")
@pytest.mark.parametrize("name", VOCABS)
def test_real_vocabulary_ids_equal_transformers(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    monkeypatch.setenv("CONVEYOR_CACHE_DIR", str(tmp_path))
    path = Path(str(VOCAB_DIR)) / f"ggml-vocab-{name}.gguf"
    texts = list(CORPUS)
    if path.with_suffix(".gguf.inp").exists():
        texts += path.with_suffix(".gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    ours = load_tokenizer(str(path))
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in texts:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == reference(
                text, add_special_tokens=special)["input_ids"], repr(text)
        ids = reference(text)["input_ids"]
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), repr(text)
