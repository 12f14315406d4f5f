"""Chat templates render exactly as transformers' `apply_chat_template` renders them: real templates of
the families conveyor runs (tests/fixtures/chat_templates, sources in SOURCES.md) over message shapes
from a plain question to tool calls, and the environment's pieces one by one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import WordLevel

from conveyor.tokenizer import Tokenizer
from conveyor.tokenizer.chat import render_chat, select_template, takes_content_parts
from conveyor.tokenizer.hf import load_hf_tokenizer

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
# Each family's special tokens, as its tokenizer_config.json names them.
SPECIAL_TOKENS = {
    "gemma-3": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
    "llama-3.1": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama-3.2": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "qwen-2.5": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "qwen-3": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "mistral-nemo": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "mistral-small-3.2": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "deepseek-r1-distill-qwen": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
}

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city <today> & \"now\"",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City, e.g. Zürich"}},
                   "required": ["city"]}}}
TOOL_CALL = {"id": "call12345", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
SYSTEM = {"role": "system", "content": "You are terse. Answer in one line."}
USER = {"role": "user", "content": "What's the weather in Zürich? Use <b>tags</b> & \"quotes\" 🤖"}
TURNS = [SYSTEM, {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
         {"role": "user", "content": "  Tell me a joke.  "}]

# name: (messages, options for apply_chat_template)
SHAPES: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "one user message": ([USER], {"add_generation_prompt": True}),
    "no generation prompt": ([USER], {"add_generation_prompt": False}),
    "system and user": ([SYSTEM, USER], {"add_generation_prompt": True}),
    "multi-turn": (TURNS, {"add_generation_prompt": True}),
    "tools offered": ([SYSTEM, USER], {"add_generation_prompt": True, "tools": [WEATHER_TOOL]}),
    "tool call and result": ([USER, {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                              {"role": "tool", "tool_call_id": "call12345", "name": "get_weather",
                               "content": '{"temperature": 21}'}],
                             {"add_generation_prompt": True, "tools": [WEATHER_TOOL]}),
    # What the server sends a template for an assistant message without content, as vLLM does.
    "tool call, empty content": ([USER, {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
                                  {"role": "tool", "tool_call_id": "call12345", "content": "21 C"}],
                                 {"add_generation_prompt": True, "tools": [WEATHER_TOOL]}),
    "continue final message": ([USER, {"role": "assistant", "content": "The weather is"}],
                               {"add_generation_prompt": False, "continue_final_message": True}),
    "history with reasoning": ([USER, {"role": "assistant", "content": "Sunny.", "reasoning_content": "Look up."},
                                {"role": "user", "content": "Thanks"}], {"add_generation_prompt": True}),
    "thinking off": ([USER], {"add_generation_prompt": True, "chat_template_kwargs": {"enable_thinking": False}}),
}


def _hf_tokenizer(special_tokens: dict[str, str]) -> Any:
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["[UNK]", *special_tokens.values()])}
    return PreTrainedTokenizerFast(tokenizer_object=RustTokenizer(WordLevel(vocab, unk_token="[UNK]")),
                                   **special_tokens)


def _render_hf(template: str, special_tokens: dict[str, str], messages: list[dict[str, Any]],
               options: dict[str, Any]) -> str:
    options = dict(options)
    kwargs = options.pop("chat_template_kwargs", {})
    return _hf_tokenizer(special_tokens).apply_chat_template(
        messages, chat_template=template, tokenize=False, **options, **kwargs)


def _outcome(render: Any) -> tuple[str, str]:
    """The prompt, or the kind of error: both sides must fail alike when a template refuses a shape."""
    try:
        return "ok", render()
    except (jinja2.TemplateError, ValueError, TypeError) as error:
        return "error", type(error).__name__ if not isinstance(error, jinja2.TemplateError) else "TemplateError"


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("family", list(SPECIAL_TOKENS))
def test_rendering_equals_transformers(family: str, shape: str) -> None:
    template = (TEMPLATES / f"{family}.jinja").read_text()
    special_tokens = SPECIAL_TOKENS[family]
    messages, options = SHAPES[shape]
    ours = Tokenizer(RustTokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")), special_tokens, [], template)
    expected = _outcome(lambda: _render_hf(template, special_tokens, messages, options))
    assert _outcome(lambda: ours.apply_chat_template(messages, **options)) == expected
    if family in ("llama-3.1", "qwen-2.5", "qwen-3", "mistral-small-3.2") and shape in ("one user message",
                                                                                       "tools offered"):
        assert expected[0] == "ok"  # the shapes every family must render, not only fail alike


def test_the_shapes_exercise_what_they_claim() -> None:
    """Guards against a parity test passing because both sides ignore an option."""
    qwen3 = (TEMPLATES / "qwen-3.jinja").read_text()
    special = SPECIAL_TOKENS["qwen-3"]

    def render(shape: str) -> str:
        return render_chat(qwen3, SHAPES[shape][0], special_tokens=special, **{
            key.replace("chat_template_kwargs", "template_kwargs"): value for key, value in SHAPES[shape][1].items()})

    assert render("thinking off").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render("one user message").endswith("<|im_start|>assistant\n")
    assert render("continue final message").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nThe weather is")
    tools = render("tools offered")
    assert json.dumps(WEATHER_TOOL, ensure_ascii=False) in tools  # tojson: no HTML escaping, no \u escapes
    assert "<think>\nLook up.\n</think>" not in render("history with reasoning")  # reasoning before the last query
    history = [USER, {"role": "assistant", "content": "Sunny.", "reasoning_content": "Look up."}]
    assert "<think>\nLook up.\n</think>\n\nSunny." in render_chat(qwen3, history, special_tokens=special)


def test_environment_matches_transformers() -> None:
    template = ("{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}{{ m.content }}"
                "{% if loop.index == 3 %}{% break %}{% endif %}{% endfor %}|{{ x | tojson(indent=2) }}"
                "|{{ x | tojson(separators=(',', ':'), sort_keys=true) }}|{{ strftime_now('%Y') }}"
                "|{% generation %}kept{% endgeneration %}")
    messages = [{"role": "user", "content": "a"}, {"role": "skip", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "user", "content": "d"}]
    x = {"b": "<é>", "a": [1, 2]}
    ours = render_chat(template, messages, special_tokens={}, template_kwargs={"x": x})
    assert ours == _render_hf(template, {}, messages, {"chat_template_kwargs": {"x": x}})
    assert ours.startswith('ac|{\n  "b": "<é>",') and '|{"a":[1,2],"b":"<é>"}|' in ours and ours.endswith("|kept")
    with pytest.raises(jinja2.TemplateError, match="nope"):
        render_chat("{{ raise_exception('nope') }}", messages, special_tokens={})
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat("{{ messages.__class__ }}{% set ns = namespace(_x=1) %}", messages, special_tokens={})


def test_options_that_conflict_or_cannot_apply_are_refused() -> None:
    template = (TEMPLATES / "qwen-3.jinja").read_text()
    with pytest.raises(ValueError, match="cannot both be set"):
        render_chat(template, [USER], special_tokens={}, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ValueError, match="own request fields"):
        render_chat(template, [USER], special_tokens={}, template_kwargs={"messages": []})
    with pytest.raises(ValueError, match="final message with content"):
        render_chat(template, [USER, {"role": "assistant", "tool_calls": [TOOL_CALL]}], special_tokens={},
                    continue_final_message=True)


def test_content_parts_follow_the_template() -> None:
    """A template that loops over content gets OpenAI's parts; one that does not gets the text joined."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    gemma = (TEMPLATES / "gemma-3.jinja").read_text()
    qwen = (TEMPLATES / "qwen-2.5.jinja").read_text()
    assert takes_content_parts(gemma) and not takes_content_parts(qwen)
    assert "<start_of_turn>user\nonetwo<end_of_turn>" in render_chat(gemma, parts, special_tokens={})
    assert "<|im_start|>user\none\ntwo<|im_end|>" in render_chat(qwen, parts, special_tokens={})


def test_named_templates_from_a_directory(tmp_path: Path) -> None:
    """chat_template.jinja and additional_chat_templates/ win over tokenizer_config.json, as in transformers;
    tools pick the "tool_use" template."""
    backend = RustTokenizer(WordLevel({"[UNK]": 0, "<s>": 1}, unk_token="[UNK]"))
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "chat_template": [{"name": "default", "template": "config"}]}))
    assert load_hf_tokenizer(tmp_path).chat_template == {"default": "config"}
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}default")
    assert load_hf_tokenizer(tmp_path).chat_template == "{{ bos_token }}default"
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("tools: {{ tools | length }}")
    ours = load_hf_tokenizer(tmp_path)
    assert ours.apply_chat_template([USER]) == "<s>default"
    assert ours.apply_chat_template([USER], tools=[WEATHER_TOOL]) == "tools: 1"
    with pytest.raises(ValueError, match="none is named default"):
        select_template({"rag": "x"}, None)
