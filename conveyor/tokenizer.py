"""Text <-> token ids: a `tokenizers` (Rust) tokenizer from tokenizer.json or from GGUF metadata, an
incremental detokenizer for streaming, and chat templates.

A Gemma GGUF carries its SentencePiece vocabulary and scores but no merges. We rebuild the BPE merges the
way Hugging Face does for these files (merge order = token order in the file; runs of spaces respelled
with U+2581), so the ids match transformers' tokenizer. Building that for 262k tokens takes seconds, so the
result is cached as tokenizer.json, keyed by a hash of the metadata that defines it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE

from conveyor.cache import atomic_write_path, cache_dir, file_fingerprint
from conveyor.model.gguf_file import GGUFFile

_CACHE_FORMAT = 1
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types

# Gemma's turn format, used when a Gemma model ships no template. The system message, if any, is folded
# into the first user turn, as Gemma's own template does.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ (first_user_prefix if loop.first else '') + message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


class Tokenizer:
    def __init__(self, backend: RustTokenizer, bos_token: str | None, eos_tokens: list[str],
                 pad_token: str | None, add_bos: bool, chat_template: str | None, is_gemma: bool = False) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token = eos_tokens[0] if eos_tokens else None
        self.eos_token_ids = [i for i in (backend.token_to_id(t) for t in eos_tokens) if i is not None]
        self.pad_token_id = backend.token_to_id(pad_token) if pad_token else None
        self.add_bos = add_bos and self.bos_token_id is not None
        self.chat_template = chat_template or (GEMMA_CHAT_TEMPLATE if is_gemma else None)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}

    # ---- loading -----------------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | Path, chat_template: str | None = None) -> Tokenizer:
        directory = Path(path)
        file = directory if directory.is_file() else directory / "tokenizer.json"
        if not file.exists():
            raise ValueError(f"no tokenizer.json in {directory}")
        directory = file.parent
        settings: dict[str, Any] = {}
        for name in ("config.json", "special_tokens_map.json", "tokenizer_config.json"):
            if (directory / name).exists():
                settings.update(json.loads((directory / name).read_text()))
        backend = RustTokenizer.from_file(str(file))

        def token_text(value: Any) -> str | None:
            return value.get("content") if isinstance(value, dict) else value

        eos = token_text(settings.get("eos_token"))
        eos_tokens = [eos] if isinstance(eos, str) else []
        model_type = str(settings.get("model_type", ""))
        if model_type.startswith("gemma") and backend.token_to_id("<end_of_turn>") is not None:
            eos_tokens.append("<end_of_turn>")
        return cls(backend, token_text(settings.get("bos_token")), eos_tokens, token_text(settings.get("pad_token")),
                   bool(settings.get("add_bos_token", False)),
                   _read_template(chat_template) or settings.get("chat_template"), model_type.startswith("gemma"))

    @classmethod
    def from_gguf(cls, path: str | Path, chat_template: str | None = None) -> Tokenizer:
        # NOTE: parsing 262k tokens of GGUF metadata alone takes ~10 s, so the cache is keyed by the
        # file's fingerprint and checked before the file is parsed at all.
        cached = cache_dir() / "tokenizers" / f"{file_fingerprint(path, salt=f'tokenizer {_CACHE_FORMAT}')}.json"
        settings_file = cached.with_suffix(".settings.json")
        if cached.exists() and settings_file.exists():
            backend = RustTokenizer.from_file(str(cached))
            settings = json.loads(settings_file.read_text())
        else:
            backend, settings = _convert_gguf(path)
            partial = atomic_write_path(cached)
            backend.save(str(partial))
            partial.replace(cached)
            partial = atomic_write_path(settings_file)
            partial.write_text(json.dumps(settings))
            partial.replace(settings_file)
        return cls(backend, settings["bos_token"], settings["eos_tokens"], settings["pad_token"], settings["add_bos"],
                   _read_template(chat_template) or settings["chat_template"], is_gemma=True)

    # ---- text and ids ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        # NOTE: a chat template usually writes the BOS itself; never add a second one.
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]  # type: ignore[list-item]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template; pass --chat-template FILE")
        return _compile(self.chat_template).render(
            messages=[_flatten_content(m) for m in messages], add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def load_tokenizer(path: str, chat_template: str | None = None) -> Tokenizer:
    """From a .gguf file, a tokenizer.json, or a directory holding one."""
    if path.endswith(".gguf"):
        return Tokenizer.from_gguf(path, chat_template)
    return Tokenizer.from_hf_dir(path, chat_template)


def _convert_gguf(path: str | Path) -> tuple[RustTokenizer, dict[str, Any]]:
    field = GGUFFile(str(path)).get

    arch, model = field("general.architecture"), field("tokenizer.ggml.model")
    if model != "llama" or not str(arch).startswith("gemma"):
        raise ValueError(f"conveyor builds tokenizers from GGUF for Gemma models only (this one is {arch!r} "
                         f"with a {model!r} tokenizer); pass --tokenizer with the model's tokenizer.json")
    tokens: list[str] = field("tokenizer.ggml.tokens")

    def token(id_key: str) -> str | None:
        token_id = field(id_key)
        return tokens[token_id] if token_id is not None else None

    eos_tokens = [t for t in (token("tokenizer.ggml.eos_token_id"),) if t]
    if "<end_of_turn>" in tokens:  # chat turns end with it
        eos_tokens.append("<end_of_turn>")
    settings = {"bos_token": token("tokenizer.ggml.bos_token_id"), "eos_tokens": eos_tokens,
                "pad_token": token("tokenizer.ggml.padding_token_id"),
                "add_bos": bool(field("tokenizer.ggml.add_bos_token", True)),
                "chat_template": field("tokenizer.chat_template")}
    return build_gemma_tokenizer(tokens, field("tokenizer.ggml.token_type")), settings


def build_gemma_tokenizer(tokens: list[str], token_types: list[int]) -> RustTokenizer:
    """SentencePiece BPE with byte fallback, merges recovered from the vocabulary."""
    # Runs of spaces are stored as spaces, but the normalizer turns spaces into U+2581 before lookup.
    spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(spelled)}
    backend = RustTokenizer(BPE(vocab=vocab, merges=_recover_merges(vocab), unk_token="<unk>", fuse_unk=True,
                                byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
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


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    return Path(path).read_text()


def _flatten_content(message: dict[str, Any]) -> dict[str, Any]:
    """OpenAI allows content as a list of parts; templates here expect a string."""
    content = message.get("content")
    if isinstance(content, list):
        text = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return {**message, "content": text}
    return {**message, "content": content or ""}


def _raise(message: str) -> None:
    raise TemplateError(message)


_TEMPLATES: dict[str, Any] = {}


def _compile(source: str) -> Any:
    if source not in _TEMPLATES:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, never cutting a UTF-8 character in half.

    It decodes a short window of recent tokens twice (with and without the newest ones) and emits the
    difference, holding back while the window's text ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: decoded for context only
        self.read_offset = 0  # tokens before this have been emitted
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta
