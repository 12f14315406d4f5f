"""Tokenizer: the same ids as transformers' AutoTokenizer for every source, chat encoding, streaming."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, normalizers, processors
from tokenizers.models import BPE

from conveyor.tokenizer import GEMMA_CHAT_TEMPLATE, IncrementalDetokenizer, Tokenizer, load_tokenizer
from conveyor.tokenizer.pipelines import set_special_token_template
from tests.tokenizer_parity import CORPUS, assert_same_ids_as_transformers


def _byte_fallback_tokenizer() -> Tokenizer:
    """A tiny SentencePiece-style BPE with byte fallback: every non-ASCII character splits into bytes."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({f"<0x{b:02X}>": 4 + b for b in range(256)})
    for ch in "abcdefghijklmnopqrstuvwxyz\u2581":
        vocab[ch] = len(vocab)
    backend = RustTokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    backend.add_special_tokens(["<pad>", "<eos>", "<bos>"])
    set_special_token_template(backend, "<bos>", "<eos>", add_bos=True, add_eos=False)
    return Tokenizer(backend, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, ["<eos>"],
                     GEMMA_CHAT_TEMPLATE)


def test_incremental_detokenizer_never_emits_half_a_character() -> None:
    tokenizer = _byte_fallback_tokenizer()
    text = "hi 🤖 und ü 👩‍👧 ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # the emoji really are split into byte tokens
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.add(token) for token in ids]
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert detokenizer.text == text


def test_incremental_detokenizer_skips_special_tokens() -> None:
    tokenizer = _byte_fallback_tokenizer()
    ids = [2, *tokenizer.encode("ab", add_special_tokens=False), 1]
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert "".join(detokenizer.add(t) for t in ids) == "ab"
    keep = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    assert "".join(keep.add(t) for t in ids) == "<bos>ab<eos>"


def test_special_tokens_are_added_as_transformers_adds_them() -> None:
    tokenizer = _byte_fallback_tokenizer()
    ab = tokenizer.encode("ab", add_special_tokens=False)
    assert tokenizer.encode("ab") == [2, *ab]
    assert tokenizer.encode("<bos>ab") == [2, 2, *ab]  # as transformers: user text is not inspected
    # A chat template writes its own BOS; the automatic one is not added on top of it.
    chat = tokenizer.encode_chat([{"role": "user", "content": "ab"}])
    assert chat[:2] != [2, 2] and chat == tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": "ab"}]), add_special_tokens=False)
    assert chat.count(2) == 1 and chat[0] == 2


def test_chat_templates_gemma_fallback_override_and_errors() -> None:
    tokenizer = _byte_fallback_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi "},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "text",
                                                                                        "text": "Bye"}]}]
    assert tokenizer.apply_chat_template(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    assert tokenizer.apply_chat_template(messages[1:2]) == "[user]Hi "
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template(messages)


# ---- Hugging Face directories: the same ids as AutoTokenizer --------------------------------------------


def _sentencepiece_json(prefix_normalizer: bool, post_processor: bool) -> dict[str, Any]:
    """A Llama-2 / Gemma style tokenizer.json: byte fallback, a few merges, BOS by post-processor."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"<0x{b:02X}>": len(vocab) for b in range(256)})
    for piece in [*"abcdefghijklmnopqrstuvwxyz\u2581TFP.,", "\u2581t", "he", "\u2581the", "\u2581\u2581"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ("\u2581", "\u2581")]
    backend = RustTokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    steps = [normalizers.Prepend("\u2581")] if prefix_normalizer else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    backend.add_special_tokens(["<unk>", "<s>", "</s>", "<pad>"])
    if post_processor:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return json.loads(backend.to_str())


def _write_dir(path: Path, tokenizer_json: dict[str, Any], tokenizer_config: dict[str, Any],
               model_type: str) -> Path:
    path.mkdir(parents=True)
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
# (tokenizer.json shape, tokenizer_config.json, model_type): each a way transformers reads a directory.
HF_DIRECTORIES: dict[str, tuple[dict[str, bool], dict[str, Any], str]] = {
    # The class rebuilds the pipeline: a prefix space before the first chunk only (legacy=False) ...
    "llama-class": ({"prefix_normalizer": True, "post_processor": True},
                    {"tokenizer_class": "LlamaTokenizerFast", **SPECIALS}, "llama"),
    # ... or before every chunk between special tokens (legacy=True), or never.
    "llama-class-legacy": ({"prefix_normalizer": True, "post_processor": True},
                           {"tokenizer_class": "LlamaTokenizer", "legacy": True, **SPECIALS}, "llama"),
    "llama-class-no-prefix": ({"prefix_normalizer": True, "post_processor": True},
                              {"tokenizer_class": "LlamaTokenizer", "add_prefix_space": False, **SPECIALS},
                              "llama"),
    # add_bos_token in tokenizer_config.json is ignored when tokenizer.json exists (transformers 5).
    "no-post-processor-add-bos-ignored": ({"prefix_normalizer": True, "post_processor": False},
                                          {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                           "add_eos_token": True, **SPECIALS}, "llama"),
    # A generic class runs the file as written (its Prepend normalizer: a prefix space on every chunk).
    "as-written": ({"prefix_normalizer": True, "post_processor": True},
                   {"tokenizer_class": "PreTrainedTokenizerFast", **SPECIALS}, "llama"),
    # Gemma's class: no prefix space, whatever the file says.
    "gemma-class-by-model-type": ({"prefix_normalizer": True, "post_processor": True},
                                  {**SPECIALS, "unk_token": "<unk>"}, "gemma3_text"),
    # A special token named in the config but not in the file is matched whole, with a new id.
    "named-token-not-in-file": ({"prefix_normalizer": False, "post_processor": True},
                                {"tokenizer_class": "PreTrainedTokenizerFast", **SPECIALS,
                                 "mask_token": "<mask>"}, "llama"),
}


@pytest.mark.parametrize("name", list(HF_DIRECTORIES))
def test_hf_directory_ids_equal_transformers(name: str, tmp_path: Path) -> None:
    shape, tokenizer_config, model_type = HF_DIRECTORIES[name]
    directory = _write_dir(tmp_path / name, _sentencepiece_json(**shape), tokenizer_config, model_type)
    assert_same_ids_as_transformers(load_tokenizer(str(directory)), directory)


@pytest.mark.parametrize("architecture", ["gemma3", "llama", "qwen2", "qwen3"])
def test_tiny_model_ids_equal_transformers(architecture: str, tiny_model_dirs: dict[str, Path]) -> None:
    directory = tiny_model_dirs[architecture]
    assert_same_ids_as_transformers(load_tokenizer(str(directory)), directory)


# ---- the default model (GGUF) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    from conveyor.model.loader import default_model_path

    return load_tokenizer(default_model_path())


@pytest.mark.slow
def test_same_ids_as_transformers_gguf_tokenizer(ours: Tokenizer) -> None:
    from conveyor.model.loader import default_model_path

    path = Path(default_model_path())
    assert_same_ids_as_transformers(ours, path.parent, gguf_file=path.name)


@pytest.mark.slow
def test_streaming_real_text(ours: Tokenizer) -> None:
    text = " ".join(CORPUS)
    ids = ours.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(ours)
    deltas = [detokenizer.add(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == ours.decode(ids)
