"""A tokenizer from a Hugging Face directory (tokenizer.json + tokenizer_config.json), encoding as
transformers' `AutoTokenizer` (5.x) does for the same directory:

- the tokenizer class is chosen as AutoTokenizer chooses it, and the classes conveyor's families use
  bring their own pipeline (see `pipelines`);
- special tokens (BOS/EOS) come from tokenizer.json's post-processor alone. transformers ignores
  `add_bos_token` / `add_eos_token` in tokenizer_config.json when a tokenizer.json exists, and so do we;
- the special tokens tokenizer_config.json names (and the class's defaults) are matched whole.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as RustTokenizer

from conveyor.tokenizer.chat import GEMMA_CHAT_TEMPLATE, ChatTemplates, read_template
from conveyor.tokenizer.pipelines import (
    DEFAULT_SPECIAL_TOKENS,
    PIPELINES,
    SPECIAL_TOKEN_NAMES,
    add_missing_tokens,
    token_content,
)
from conveyor.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# AutoTokenizer's class for a config.json model_type, where it has one (transformers.models.auto).
_CLASS_BY_MODEL_TYPE = {
    **dict.fromkeys(("gemma", "gemma2", "gemma3", "gemma3_text"), "GemmaTokenizer"),
    **dict.fromkeys(("qwen2", "qwen3", "qwen3_moe"), "Qwen2Tokenizer"),
}
# Model types whose declared tokenizer_class AutoTokenizer overrides with its own.
_DECLARED_CLASS_OVERRIDDEN = {"qwen2"}
# Classes that run tokenizer.json as written ("PreTrainedTokenizerFast" less its "Fast").
_AS_WRITTEN = {"TokenizersBackend", "PreTrainedTokenizer"}


def load_hf_tokenizer(path: str | Path, chat_template_file: str | None = None) -> Tokenizer:
    """From a directory holding tokenizer.json, or the tokenizer.json itself."""
    file = Path(path) if Path(path).is_file() else Path(path) / "tokenizer.json"
    if not file.exists():
        raise ValueError(f"no tokenizer.json in {path}")
    directory = file.parent
    model_config = _read_json(directory / "config.json")
    settings = {**_read_json(directory / "special_tokens_map.json"),
                **_read_json(directory / "tokenizer_config.json")}
    serialized = file.read_text()
    backend = RustTokenizer.from_str(serialized)

    class_name = tokenizer_class(settings, model_config, byte_level='"ByteLevel"' in serialized)
    if class_name not in PIPELINES and class_name not in _AS_WRITTEN:
        logger.warning("%s declares %s; conveyor runs its tokenizer.json as written, which transformers' %s "
                       "may not", directory, class_name, class_name)
    named = {**(DEFAULT_SPECIAL_TOKENS[class_name] if class_name in PIPELINES else {}),
             **{name: settings[name] for name in SPECIAL_TOKEN_NAMES if name in settings}}
    if class_name in PIPELINES:
        PIPELINES[class_name](backend, {**settings, "unk_token": token_content(named.get("unk_token"))})
    listed = settings.get("added_tokens_decoder") or {}
    add_missing_tokens(backend, [listed[key] for key in sorted(listed, key=int)], special=False)
    extras = settings.get("extra_special_tokens") or settings.get("additional_special_tokens") or []
    add_missing_tokens(backend, [*named.values(), *(extras.values() if isinstance(extras, dict) else extras)])

    special_tokens = {name: content for name, value in named.items() if (content := token_content(value))}
    is_gemma = class_name == "GemmaTokenizer" or str(model_config.get("model_type", "")).startswith("gemma")
    stop_tokens = [special_tokens["eos_token"]] if "eos_token" in special_tokens else []
    if is_gemma and backend.token_to_id("<end_of_turn>") is not None:
        stop_tokens.append("<end_of_turn>")  # chat turns end with it
    template = read_template(chat_template_file) or _chat_template(directory, settings)
    if template is None and is_gemma:
        template = GEMMA_CHAT_TEMPLATE
    return Tokenizer(backend, special_tokens, stop_tokens, template)


def tokenizer_class(settings: dict[str, Any], model_config: dict[str, Any], byte_level: bool) -> str:
    """The class name AutoTokenizer picks (without "Fast"); "TokenizersBackend" runs the file as written."""
    model_type = str(model_config.get("model_type") or "")
    registered = _CLASS_BY_MODEL_TYPE.get(model_type, "TokenizersBackend")
    declared = settings.get("tokenizer_class") or model_config.get("tokenizer_class")
    if not declared:
        return registered
    declared = str(declared).removesuffix("Fast")
    if model_type in _DECLARED_CLASS_OVERRIDDEN:
        return registered
    if declared == "LlamaTokenizer" and byte_level:
        return "TokenizersBackend"  # Llama 3 style: declared LlamaTokenizer, but a byte-level file
    return declared


def _chat_template(directory: Path, settings: dict[str, Any]) -> ChatTemplates | None:
    """As transformers reads it: chat_template.jinja (the "default") and additional_chat_templates/*.jinja
    (named) win over tokenizer_config.json's entry, which is one template or a list of named ones."""
    files = {}
    if (directory / "chat_template.jinja").exists():
        files["default"] = (directory / "chat_template.jinja").read_text()
    if (directory / "additional_chat_templates").is_dir():
        files.update({path.name.removesuffix(".jinja"): path.read_text()
                      for path in sorted((directory / "additional_chat_templates").glob("*.jinja"))})
    if files:
        return files["default"] if list(files) == ["default"] else files
    template = _read_json(directory / "chat_template.json").get("chat_template")
    template = template or settings.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        return {entry["name"]: entry["template"] for entry in template}
    return template


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}
