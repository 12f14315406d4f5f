"""Chat templates: Jinja, rendered as transformers renders them (sandboxed, `raise_exception`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Template
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

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


def read_template(path: str | None) -> str | None:
    return Path(path).read_text() if path is not None else None


def render_chat(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
                special_tokens: dict[str, str], tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text; `special_tokens` (bos_token, eos_token, ...) are template variables, and so is
    `tools` (OpenAI's tool objects, as transformers' `apply_chat_template(tools=...)` passes them)."""
    return _compile(template).render(messages=[_flatten_content(m) for m in messages],
                                     add_generation_prompt=add_generation_prompt, tools=tools, **special_tokens)


def _flatten_content(message: dict[str, Any]) -> dict[str, Any]:
    """OpenAI allows content as a list of parts; templates here expect a string."""
    content = message.get("content")
    if isinstance(content, list):
        text = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return {**message, "content": text}
    return {**message, "content": content or ""}


def _raise(message: str) -> None:
    raise TemplateError(message)


@lru_cache(maxsize=16)
def _compile(source: str) -> Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(source)
