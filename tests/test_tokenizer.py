"""Tokenizer: GGUF conversion against transformers' own, incremental detokenization, chat templates."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, normalizers
from tokenizers.models import BPE

from conveyor.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

CORPUS = [
    "The capital of France is Paris.",
    "",
    "  leading and trailing spaces  ",
    "runs    of     spaces\n\n\nand\t\ttabs\r\n",
    "日本語のテキストと中文文本，还有한국어.",
    "Ça va? Übermäßig große Äpfel — naïve café. ¿Qué tal?",
    "עברית ועربية mixed right-to-left",
    "def f(x):\n    if x > 1:\n        return [i ** 2 for i in range(x)]  # comment\n",
    "emoji 🤖🎉 and ZWJ 👩‍👩‍👧‍👦 and flags 🇫🇷 and skin tones 👍🏽",
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "Numbers 1234567890 and 3.14159, URLs https://example.com/a?b=c&d=e",
    "\u200b zero width and \ufeff BOM and \x00 null",
]


def _byte_fallback_tokenizer() -> Tokenizer:
    """A tiny SentencePiece-style BPE with byte fallback: every non-ASCII character splits into bytes."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({f"<0x{b:02X}>": 4 + b for b in range(256)})
    for ch in "abcdefghijklmnopqrstuvwxyz\u2581":
        vocab[ch] = len(vocab)
    backend = RustTokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(["<pad>", "<eos>", "<bos>"])
    return Tokenizer(backend, "<bos>", ["<eos>"], "<pad>", add_bos=True, chat_template=None, is_gemma=True)


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


def test_bos_is_added_once() -> None:
    tokenizer = _byte_fallback_tokenizer()
    assert tokenizer.encode("ab")[0] == 2 and tokenizer.encode("ab")[1] != 2
    assert tokenizer.encode("<bos>ab") == tokenizer.encode("ab")  # a template's own BOS is not doubled
    assert tokenizer.encode("ab", add_special_tokens=False)[0] != 2


def test_chat_templates_gemma_fallback_override_and_errors(tmp_path: Path) -> None:
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


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    from conveyor.model.loader import default_model_path

    return load_tokenizer(default_model_path())


@pytest.mark.slow
def test_same_ids_as_transformers_gguf_tokenizer(ours: Tokenizer) -> None:
    from transformers import AutoTokenizer

    from conveyor.model.loader import default_model_path

    path = Path(default_model_path())
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in CORPUS:
        assert ours.encode(text) == reference(text)["input_ids"], repr(text)
        assert ours.decode(ours.encode(text)) == reference.decode(reference(text)["input_ids"],
                                                                  skip_special_tokens=True), repr(text)


@pytest.mark.slow
def test_streaming_real_text(ours: Tokenizer) -> None:
    text = " ".join(CORPUS)
    ids = ours.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(ours)
    deltas = [detokenizer.add(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == ours.decode(ids)
