"""Chat templates: Jinja, rendered as transformers' `apply_chat_template` renders them.

The environment is transformers' (`utils/chat_template_utils.py`): sandboxed, `trim_blocks` and
`lstrip_blocks`, loop controls, the `{% generation %}` tag, a `tojson` that does not escape HTML and takes
`ensure_ascii`/`indent`/`separators`/`sort_keys`, `raise_exception` and `strftime_now`. The variables are
too: `messages`, `tools`, `documents`, `add_generation_prompt`, the special tokens (bos_token, ...) and any
extra keyword (Qwen 3's `enable_thinking`); `continue_final_message` cuts the prompt after the final
message as transformers does. A model may ship several named templates; `select_template` picks one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# One template, or named ones ("default", "tool_use", ...) as tokenizer_config.json or a GGUF may hold.
ChatTemplates = str | dict[str, str]

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

# Variables the renderer sets itself; `chat_template_kwargs` may not replace them.
RESERVED_TEMPLATE_VARIABLES = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message"})
# transformers copies a message's reasoning under each of these names; templates read one of them.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def read_template(path: str | None) -> str | None:
    return Path(path).read_text() if path is not None else None


def select_template(templates: ChatTemplates, tools: list[Any] | None) -> str:
    """transformers' choice among named templates: "tool_use" when tools are given, else "default"."""
    if isinstance(templates, str):
        return templates
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise ValueError(f"the model has several chat templates and none is named default: {sorted(templates)}")


def render_chat(template: str, messages: list[dict[str, Any]], *, special_tokens: Mapping[str, str],
                add_generation_prompt: bool = False, continue_final_message: bool = False,
                tools: list[dict[str, Any]] | None = None, documents: list[dict[str, Any]] | None = None,
                template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The prompt text, as `tokenizer.apply_chat_template(messages, tokenize=False, ...)` gives it.

    `continue_final_message` leaves the final message open (no end-of-turn after it), so the model
    continues it; it cannot be combined with `add_generation_prompt`, as in transformers and vLLM."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be set: the first "
                         "continues the final message, the second opens a new assistant message")
    reserved = RESERVED_TEMPLATE_VARIABLES & set(template_kwargs or {})
    if reserved:
        raise ValueError(f"chat template variables {sorted(reserved)} have their own request fields")
    content_as_parts = takes_content_parts(template)
    chat = [_alias_reasoning(_plain_content(_without_none(m), content_as_parts)) for m in messages]
    final_text = ""
    if continue_final_message:
        final_text = _tag_final_message(chat, template)
    rendered = _compile(template).render(
        messages=chat, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
        **{**special_tokens, **(template_kwargs or {})})
    if continue_final_message:
        rendered = _cut_after_final_message(rendered, final_text)
    return rendered


@lru_cache(maxsize=16)
def takes_content_parts(template: str) -> bool:
    """Whether the template loops over a message's content (OpenAI's list of parts), as vLLM's "auto"
    content format detects it; otherwise list content is joined into one string first."""
    for loop in _compile(template).environment.parse(template).find_all(nodes.For):
        target = loop.iter
        if isinstance(target, nodes.Filter):  # e.g. `message['content'] | selectattr(...)`
            target = target.node
        if ((isinstance(target, nodes.Getitem) and isinstance(target.arg, nodes.Const)
             and target.arg.value == "content")
                or (isinstance(target, nodes.Getattr) and target.attr == "content")):
            return True
    return False


def _without_none(message: dict[str, Any]) -> dict[str, Any]:
    """transformers drops keys whose value is None: templates test for a missing key, not for None."""
    return {key: value for key, value in message.items() if value is not None}


def _plain_content(message: dict[str, Any], as_parts: bool) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, list) and not as_parts:  # vLLM's "string" content format: text parts joined
        text = "\n".join(part["text"] for part in content
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
        return {**message, "content": text}
    return message


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _tag_final_message(chat: list[dict[str, Any]], template: str) -> str:
    """Append a marker to the final message's text (and return that text), to find where it ends."""
    if not chat or chat[-1].get("content") is None:
        raise ValueError("continue_final_message needs a final message with content to continue")
    if "content" not in template:
        raise ValueError("continue_final_message: this chat template does not read a message's content")
    final = chat[-1] = dict(chat[-1])
    content = final["content"]
    if isinstance(content, list):
        parts = [dict(part) if isinstance(part, dict) else part for part in content]
        for part in reversed(parts):
            if isinstance(part, dict) and "text" in part:
                text = part["text"]
                part["text"] = text + _CONTINUE_TAG
                final["content"] = parts
                return str(text)
        raise ValueError("continue_final_message: the final message has no text to continue")
    final["content"] = content + _CONTINUE_TAG
    return str(content)


def _cut_after_final_message(rendered: str, final_text: str) -> str:
    if final_text.strip() not in rendered or _CONTINUE_TAG.strip() not in rendered:
        raise ValueError("continue_final_message: the chat template changed the final message, so it cannot "
                         "be continued")
    at = rendered.rindex(_CONTINUE_TAG.strip())
    if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()  # the template trimmed the message's trailing space


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps
    the body as it is, and a template using the tag must still compile."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` refusing underscore attributes, as transformers' does (no way to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's Namespace signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)
