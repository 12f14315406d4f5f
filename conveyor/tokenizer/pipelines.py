"""The text pipelines of transformers' tokenizer classes, so a backend encodes as `AutoTokenizer` does.

transformers (5.x) does not run every tokenizer.json as written: `GemmaTokenizer`, `LlamaTokenizer` and
`Qwen2Tokenizer` keep the file's vocabulary, merges, added tokens and post-processor, but bring their own
normalizer, pre-tokenizer, decoder and BPE options. Any other class (`TokenizersBackend`, alias
`PreTrainedTokenizerFast`) runs the file as written. These are the classes of the families conveyor runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE

# Qwen2Tokenizer's pre-tokenization split (transformers.models.qwen2.tokenization_qwen2).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")

# Each class's default special tokens, used where tokenizer_config.json does not name them.
DEFAULT_SPECIAL_TOKENS: dict[str, dict[str, str | None]] = {
    "GemmaTokenizer": {"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                       "mask_token": "<mask>"},
    "LlamaTokenizer": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    "Qwen2Tokenizer": {"unk_token": "<|endoftext|>", "bos_token": None, "eos_token": "<|endoftext|>",
                       "pad_token": "<|endoftext|>"},
    "GPT2Tokenizer": {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                      "eos_token": "<|endoftext|>"},
}


def _sentencepiece_decoder(strip_prefix_space: bool = False) -> decoders.Decoder:
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if strip_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    return decoders.Sequence(steps)


def _set_bpe_options(backend: RustTokenizer, **options: Any) -> None:
    """The class builds a fresh BPE from the file's vocabulary and merges, with these options."""
    if not isinstance(backend.model, BPE):
        kind = type(backend.model).__name__
        raise ValueError(f"this tokenizer class expects a BPE tokenizer.json, not {kind}")
    defaults = {"dropout": None, "ignore_merges": False, "continuing_subword_prefix": None,
                "end_of_word_suffix": None}
    for name, value in {**defaults, **options}.items():
        setattr(backend.model, name, value)


def gemma_pipeline(backend: RustTokenizer, settings: dict[str, Any]) -> None:
    """Spaces become U+2581 and each one starts a new word; no prefix space."""
    unk_token = settings.get("unk_token") or "<unk>"
    _set_bpe_options(backend, fuse_unk=True, byte_fallback=True, unk_token=unk_token)
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    backend.decoder = _sentencepiece_decoder()


def llama_pipeline(backend: RustTokenizer, settings: dict[str, Any]) -> None:
    """SentencePiece with a prefix space: before every chunk between special tokens when `legacy`,
    before the first only when not (the class default)."""
    _set_bpe_options(backend, fuse_unk=True, byte_fallback=True, unk_token=None)
    add_prefix_space = settings.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    scheme = ("always" if settings.get("legacy", False) else "first") if add_prefix_space else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    backend.decoder = _sentencepiece_decoder(strip_prefix_space=add_prefix_space)


def qwen2_pipeline(backend: RustTokenizer, settings: dict[str, Any]) -> None:
    """Byte-level BPE over NFC-normalized text, split by Qwen's regular expression."""
    _set_bpe_options(backend, fuse_unk=False, byte_fallback=False, unk_token=None,
                     continuing_subword_prefix="", end_of_word_suffix="")
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(settings.get("add_prefix_space")), use_regex=False)])
    backend.decoder = decoders.ByteLevel()


PIPELINES: dict[str, Callable[[RustTokenizer, dict[str, Any]], None]] = {
    "GemmaTokenizer": gemma_pipeline, "LlamaTokenizer": llama_pipeline, "Qwen2Tokenizer": qwen2_pipeline}


def token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def as_added_token(value: Any, special: bool = True) -> AddedToken:
    if isinstance(value, dict):
        attributes = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return AddedToken(value["content"], special=value.get("special", special), **attributes)
    return AddedToken(value, special=special, normalized=False)


def add_missing_tokens(backend: RustTokenizer, tokens: Iterable[Any], special: bool = True) -> None:
    """Tokens the tokenizer names that the backend does not match whole yet, or not as special ones.
    Like transformers, a token missing from the vocabulary gets a new id."""
    known = {t.content: t.special for t in backend.get_added_tokens_decoder().values()}
    for value in tokens:
        content = token_content(value)
        token = as_added_token(value, special) if content else None
        if token is None or (content in known and (known[content] or not token.special)):
            continue
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        known[token.content] = token.special


def set_special_token_template(backend: RustTokenizer, bos_token: str | None, eos_token: str | None,
                               add_bos: bool, add_eos: bool) -> None:
    """transformers' `update_post_processor`: BOS and/or EOS around every encoded text."""
    bos_id = backend.token_to_id(bos_token) if bos_token and add_bos else None
    eos_id = backend.token_to_id(eos_token) if eos_token and add_eos else None
    single = " ".join([*([f"{bos_token}:0"] if bos_id is not None else []), "$A:0",
                       *([f"{eos_token}:0"] if eos_id is not None else [])])
    specials = [(t, i) for t, i in ((bos_token, bos_id), (eos_token, eos_id)) if i is not None]
    backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
