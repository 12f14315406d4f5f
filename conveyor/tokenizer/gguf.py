"""A tokenizer from a GGUF file's metadata, encoding as transformers' `AutoTokenizer(gguf_file=...)` does.

The one place that reads tokenizer metadata from GGUF (the tokenizer sits above the model layer); the
backends are built in `gguf_backends`. Building one for a 262k-token vocabulary takes seconds, so the
result is cached as tokenizer.json, keyed by the file's fingerprint.

Special tokens: BOS/EOS around every text as `tokenizer.ggml.add_bos_token` / `add_eos_token` say; a
SentencePiece file without the flag gets BOS, as in transformers and llama.cpp. `add_space_prefix` is not
followed, as in transformers: Gemma never gets a prefix space, other SentencePiece vocabularies always
(LlamaTokenizer's pipeline), byte-level ones never.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as RustTokenizer

from conveyor.cache import atomic_write_path, cache_dir, file_fingerprint
from conveyor.model.gguf_file import GGUFFile
from conveyor.tokenizer.chat import GEMMA_CHAT_TEMPLATE, ChatTemplates, read_template
from conveyor.tokenizer.gguf_backends import (
    CONTROL,
    byte_level_backend,
    gemma_backend,
    sentencepiece_backend,
)
from conveyor.tokenizer.pipelines import (
    DEFAULT_SPECIAL_TOKENS,
    add_missing_tokens,
    set_special_token_template,
)
from conveyor.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 4  # 4: named chat templates, end-of-turn stop tokens
_SPECIAL_TOKEN_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                       "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}
# Tokens that end a turn as llama.cpp counts them (its end-of-generation set), where the vocabulary has
# them as control tokens: a chat model stops on them even when the file's EOS is another token.
_END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>", "<|end|>", "<end_of_turn>",
                       "<|end_of_text|>", "<|end▁of▁sentence|>", "<EOT>")


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
    template = read_template(chat_template_file) or settings["chat_template"]
    return Tokenizer(backend, settings["special_tokens"], settings["stop_tokens"], template)


def _convert(path: str | Path) -> tuple[RustTokenizer, dict[str, Any]]:
    field = GGUFFile(str(path)).get
    arch, model = str(field("general.architecture")), field("tokenizer.ggml.model")
    tokens: list[str] = field("tokenizer.ggml.tokens")
    token_types: list[int] = field("tokenizer.ggml.token_type") or [0] * len(tokens)
    is_gemma = model == "llama" and arch.startswith("gemma")
    if is_gemma:
        backend, class_name = gemma_backend(tokens, token_types), "GemmaTokenizer"
    elif model == "llama":
        backend = sentencepiece_backend(tokens, token_types, field("tokenizer.ggml.merges"),
                                        field("tokenizer.ggml.scores"))
        class_name = "LlamaTokenizer"
    elif model == "gpt2":
        backend = byte_level_backend(tokens, token_types, field("tokenizer.ggml.merges") or [],
                                     field("tokenizer.ggml.pre"))
        class_name = "GPT2Tokenizer"
    else:
        raise ValueError(f"conveyor cannot build a {model!r} tokenizer from GGUF ({arch!r}); "
                         "pass --tokenizer with the model's tokenizer.json")
    if field("tokenizer.ggml.add_space_prefix", False) and class_name != "LlamaTokenizer":
        logger.warning("%s asks for a prefix space; like transformers, conveyor adds none", path)

    named = {**DEFAULT_SPECIAL_TOKENS[class_name], **{
        name: tokens[token_id] if (token_id := field(f"tokenizer.ggml.{key}")) is not None else None
        for name, key in _SPECIAL_TOKEN_KEYS.items()}}
    special_tokens = {name: token for name, token in named.items() if token}
    add_missing_tokens(backend, special_tokens.values())
    set_special_token_template(backend, special_tokens.get("bos_token"), special_tokens.get("eos_token"),
                               add_bos=bool(field("tokenizer.ggml.add_bos_token", model == "llama")),
                               add_eos=bool(field("tokenizer.ggml.add_eos_token", False)))
    return backend, {"special_tokens": special_tokens,
                     "stop_tokens": _stop_tokens(field, tokens, token_types, special_tokens),
                     "chat_template": _chat_template(field, is_gemma)}


def _stop_tokens(field: Callable[..., Any], tokens: list[str], token_types: list[int],
                 special_tokens: dict[str, str]) -> list[str]:
    """EOS, the file's end-of-turn and end-of-message tokens, and the control tokens llama.cpp ends a
    generation on (Qwen's <|im_end|> and <|endoftext|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>)."""
    stops = [special_tokens["eos_token"]] if "eos_token" in special_tokens else []
    stops += [tokens[token_id] for key in ("eot_token_id", "eom_token_id")
              if (token_id := field(f"tokenizer.ggml.{key}")) is not None]
    stops += [token for token, kind in zip(tokens, token_types)
              if kind == CONTROL and token in _END_OF_TURN_TOKENS]
    return list(dict.fromkeys(stops))


def _chat_template(field: Callable[..., Any], is_gemma: bool) -> ChatTemplates | None:
    """`tokenizer.chat_template`, and the named ones llama.cpp's converter writes beside it
    (`tokenizer.chat_templates` lists the names, `tokenizer.chat_template.NAME` holds each)."""
    default = field("tokenizer.chat_template") or (GEMMA_CHAT_TEMPLATE if is_gemma else None)
    named = {name: template for name in field("tokenizer.chat_templates") or []
             if (template := field(f"tokenizer.chat_template.{name}"))}
    if not named:
        return default
    return {**({"default": default} if default else {}), **named}
