"""A tokenizer from a GGUF file's metadata, encoding as transformers' `AutoTokenizer(gguf_file=...)` does.

The one place that reads tokenizer metadata from GGUF (the tokenizer sits above the model layer).

A Gemma GGUF carries its SentencePiece vocabulary and scores but no merges. We rebuild the BPE merges the
way transformers does for these files (merge order = token order in the file; runs of spaces respelled
with U+2581). Building that for 262k tokens takes seconds, so the result is cached as tokenizer.json,
keyed by the file's fingerprint.

Special tokens: BOS/EOS around every text as `tokenizer.ggml.add_bos_token` / `add_eos_token` say (BOS
by default, for a SentencePiece vocabulary, as transformers and llama.cpp do). `add_space_prefix` is read
but, as in transformers' GemmaTokenizer, never adds a space: Gemma files set it false.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE

from conveyor.cache import atomic_write_path, cache_dir, file_fingerprint
from conveyor.model.gguf_file import GGUFFile
from conveyor.tokenizer.chat import GEMMA_CHAT_TEMPLATE, read_template
from conveyor.tokenizer.pipelines import (
    DEFAULT_SPECIAL_TOKENS,
    add_missing_tokens,
    gemma_pipeline,
    set_special_token_template,
)
from conveyor.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 2  # 2: the special-token post-processor is part of the cached tokenizer.json
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types
_SPECIAL_TOKEN_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                       "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def load_gguf_tokenizer(path: str | Path, chat_template_file: str | None = None) -> Tokenizer:
    # NOTE: parsing 262k tokens of GGUF metadata alone takes ~10 s, so the cache is keyed by the
    # file's fingerprint and checked before the file is parsed at all.
    cached = cache_dir() / "tokenizers" / f"{file_fingerprint(path, salt=f'tokenizer {_CACHE_FORMAT}')}.json"
    settings_file = cached.with_suffix(".settings.json")
    if cached.exists() and settings_file.exists():
        backend = RustTokenizer.from_file(str(cached))
        settings = json.loads(settings_file.read_text())
    else:
        backend, settings = _convert(path)
        for target, write in ((cached, lambda p: backend.save(str(p))),
                              (settings_file, lambda p: p.write_text(json.dumps(settings)))):
            partial = atomic_write_path(target)
            write(partial)
            partial.replace(target)
    template = read_template(chat_template_file) or settings["chat_template"] or GEMMA_CHAT_TEMPLATE
    return Tokenizer(backend, settings["special_tokens"], settings["stop_tokens"], template)


def _convert(path: str | Path) -> tuple[RustTokenizer, dict[str, Any]]:
    field = GGUFFile(str(path)).get
    arch, model = field("general.architecture"), field("tokenizer.ggml.model")
    if model != "llama" or not str(arch).startswith("gemma"):
        raise ValueError(f"conveyor builds tokenizers from GGUF for Gemma models only (this one is {arch!r} "
                         f"with a {model!r} tokenizer); pass --tokenizer with the model's tokenizer.json")
    if field("tokenizer.ggml.add_space_prefix", False):
        logger.warning("%s asks for a prefix space; like transformers' GemmaTokenizer, conveyor adds none",
                       path)
    tokens: list[str] = field("tokenizer.ggml.tokens")
    backend = build_gemma_tokenizer(tokens, field("tokenizer.ggml.token_type"))

    named = {**DEFAULT_SPECIAL_TOKENS["GemmaTokenizer"], **{
        name: tokens[token_id] if (token_id := field(f"tokenizer.ggml.{key}")) is not None else None
        for name, key in _SPECIAL_TOKEN_KEYS.items()}}
    special_tokens = {name: token for name, token in named.items() if token}
    add_missing_tokens(backend, special_tokens.values())
    set_special_token_template(backend, special_tokens.get("bos_token"), special_tokens.get("eos_token"),
                               add_bos=bool(field("tokenizer.ggml.add_bos_token", True)),
                               add_eos=bool(field("tokenizer.ggml.add_eos_token", False)))
    stop_tokens = [special_tokens["eos_token"]] if "eos_token" in special_tokens else []
    if "<end_of_turn>" in tokens:  # chat turns end with it
        stop_tokens.append("<end_of_turn>")
    return backend, {"special_tokens": special_tokens, "stop_tokens": stop_tokens,
                     "chat_template": field("tokenizer.chat_template")}


def build_gemma_tokenizer(tokens: list[str], token_types: list[int]) -> RustTokenizer:
    """SentencePiece BPE with byte fallback, merges recovered from the vocabulary."""
    # Runs of spaces are stored as spaces, but the normalizer turns spaces into U+2581 before lookup.
    spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(spelled)}
    backend = RustTokenizer(BPE(vocab=vocab, merges=_recover_merges(vocab)))
    gemma_pipeline(backend, {})
    # Control tokens stay whole and count as special; user-defined ones stay whole but are ordinary text.
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(tokens, token_types) if kind == _CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED and t in vocab])
    return backend


def _recover_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
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
