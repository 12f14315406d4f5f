"""`tokenizers` backends from the vocabulary a GGUF file lists, built as transformers builds them
(transformers.integrations.gguf): the same vocabulary spelling, merges and pipeline, so the same ids.

- Gemma (SentencePiece, no merges in the file): runs of spaces respelled with U+2581; merges recovered
  from the vocabulary, in token order (Gemma's scores do not follow its merge order).
- Other SentencePiece vocabularies (Llama 2, Mistral): the file's merges, or merges recovered and ranked
  by score; LlamaTokenizer's pipeline.
- Byte-level BPE (Llama 3, Qwen2/3): tokens respelled in the byte alphabet, the file's merges, and the
  pre-tokenization split named by `tokenizer.ggml.pre`.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE

from conveyor.tokenizer.pipelines import (
    DEFAULT_SPECIAL_TOKENS,
    QWEN2_SPLIT,
    add_missing_tokens,
    gemma_pipeline,
    llama_pipeline,
)

CONTROL, USER_DEFINED = 3, 4  # GGUF token types

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# `tokenizer.ggml.pre` -> the split its merges were learned with, for every name transformers maps
# (integrations/gguf); any other name gets GPT-2's split, on both sides.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}


def gemma_backend(tokens: list[str], token_types: list[int]) -> RustTokenizer:
    # Runs of spaces are stored as spaces, but the normalizer turns spaces into U+2581 before lookup.
    spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(spelled)}
    backend = RustTokenizer(BPE(vocab=vocab, merges=_merges_in_token_order(vocab)))
    gemma_pipeline(backend, {})
    _add_typed_tokens(backend, "GemmaTokenizer", tokens, token_types, vocab)
    return backend


def sentencepiece_backend(tokens: list[str], token_types: list[int], merges: list[str] | None,
                          scores: list[float] | None) -> RustTokenizer:
    vocab = {token: index for index, token in enumerate(tokens)}
    if merges is not None:
        pairs = [tuple(merge.split(" ")) for merge in merges]
    else:
        pairs = _merges_by_score(vocab, dict(zip(tokens, scores or [0.0] * len(tokens))))
    backend = RustTokenizer(BPE(vocab=vocab, merges=pairs))
    llama_pipeline(backend, {})
    _add_typed_tokens(backend, "LlamaTokenizer", tokens, token_types, vocab)
    return backend


def byte_level_backend(tokens: list[str], token_types: list[int], merges: list[str],
                       pre_tokenizer: str | None) -> RustTokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode()): index
             for index, token in enumerate(tokens)}
    backend = RustTokenizer(BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                                continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    split = PRE_TOKENIZER_SPLITS.get(pre_tokenizer or "")
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    # A control token outside the byte alphabet is a llama.cpp mislabel; transformers skips it too.
    types = [kind if kind != CONTROL or set(token) <= alphabet else 0
             for token, kind in zip(tokens, token_types)]
    _add_typed_tokens(backend, "GPT2Tokenizer", tokens, types, vocab)
    return backend


def _add_typed_tokens(backend: RustTokenizer, class_name: str, tokens: list[str], token_types: list[int],
                      vocab: dict[str, int]) -> None:
    """The class's default special tokens (transformers builds the class before reading the types), then
    control tokens, whole and special, and user-defined ones, whole but ordinary text."""
    add_missing_tokens(backend, DEFAULT_SPECIAL_TOKENS[class_name].values())
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(tokens, token_types) if kind == CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(tokens, token_types) if kind == USER_DEFINED and t in vocab])


def _merges_in_token_order(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary pieces is a merge; earlier tokens merge first, and
    within a token longer left pieces first."""
    merges: list[tuple[int, int, str, str]] = []
    for token, index in vocab.items():
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((index, -cut, left, right))
    merges.sort(key=lambda m: (m[0], m[1]))
    return [(left, right) for _, _, left, right in merges]


def _merges_by_score(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """transformers' `generate_merges` with scores: higher-scored tokens merge first, then longer left
    pieces; the sort is stable, so equal keys keep the file's token order."""
    merges = [(token[:cut], token[cut:], score) for token, score in scores.items()
              for cut in range(1, len(token)) if token[:cut] in vocab and token[cut:] in vocab]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the rest map past U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping
