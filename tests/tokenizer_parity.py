"""The parity corpus: texts whose ids conveyor must give exactly as transformers' AutoTokenizer does."""

from __future__ import annotations

from pathlib import Path

from conveyor.tokenizer import Tokenizer

CORPUS = [
    "The capital of France is Paris.",
    "",
    " The capital of France is",
    "  leading and trailing spaces  ",
    "runs    of     spaces\n\n\nand\t\ttabs\r\n",
    "\n\nleading newlines",
    "日本語のテキストと中文文本，还有한국어.",
    "Ça va? Übermäßig große Äpfel — naïve café. ¿Qué tal?",
    "decomposed: cafe\u0301 and A\u030a",  # NFC-normalizing tokenizers (Qwen2) change these
    "עברית ועربية mixed right-to-left",
    "def f(x):\n    if x > 1:\n        return [i ** 2 for i in range(x)]  # comment\n",
    "emoji 🤖🎉 and ZWJ 👩‍👩‍👧‍👦 and flags 🇫🇷 and skin tones 👍🏽",
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "<bos>user text that starts with the BOS string",
    "special strings in user text: <eos> <pad> <s> </s> <unk> <mask> <|endoftext|> <|im_start|>",
    "<s>glued</s>to<pad>text<eos>x",  # SentencePiece's prefix space after a special token, or not (legacy)
    "Numbers 1234567890 and 3.14159, URLs https://example.com/a?b=c&d=e",
    "\u200b zero width and \ufeff BOM and \x00 null",
]


def assert_same_ids_as_transformers(ours: Tokenizer, directory: Path, gguf_file: str | None = None) -> None:
    """Ids with and without special tokens, and the text decoded back, over the corpus."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
    for text in CORPUS:
        ids = reference(text)["input_ids"]
        assert ours.encode(text) == ids, repr(text)
        assert ours.encode(text, add_special_tokens=False) == reference(text, add_special_tokens=False)[
            "input_ids"], repr(text)
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), repr(text)
