"""A whole model from one GGUF file, for each tokenizer family llama.cpp users have on disk: Llama 3 and
Qwen 2.5/3 (byte-level BPE), Mistral Nemo (tekken) and Mistral 7B (SentencePiece). Each file holds a
tokenizer trained here with `tokenizers` (the family's pre-tokenization split, its special tokens and token
types, its published chat template) and a tiny random-weight model, written as llama.cpp writes them.
conveyor's ids must equal transformers' `AutoTokenizer.from_pretrained(dir, gguf_file=...)` on the same
file, for plain text and for chat prompts, and the file must serve on its own."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from conveyor import LLM, SamplingParams
from conveyor.tokenizer import load_tokenizer
from tests.test_loader import write_gguf
from tests.tiny_models import VOCAB_SIZE
from tests.tokenizer_parity import CORPUS, assert_same_ids_as_transformers

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6  # GGUF token types
TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
# What the tokenizers learn from: every kind of text the parity corpus has, many times over.
TRAINING_TEXT = [*CORPUS, "for (int i = 0; i < 10; ++i) { total += values[i] * 2; }",
                 "The quick brown fox jumps over the lazy dog. 1,234,567.89 and 2024-11-25",
                 "    indented code\n\tand tabs\n\n\n", "多语言文本：日本語、中文、한국어 and English mixed",
                 "naïve résumé façade Ångström", "emoji 🤖🎉👍🏽 and symbols ∑∫√ ≠ ≤"] * 20


@dataclass(frozen=True)
class Family:
    arch: str  # general.architecture, and the tiny model directory the weights come from
    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    template: str
    control: list[str]  # special tokens, CONTROL in the file
    bos: str | None
    eos: str
    add_bos: bool
    user_defined: list[str] = field(default_factory=list)  # added, but ordinary text (Qwen 3's <think>)
    model_dir: str = ""

    @property
    def weights(self) -> str:
        return self.model_dir or self.arch


FAMILIES = {
    "llama-3": Family("llama", "gpt2", "llama-bpe", "llama-3.1",
                      ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"], "<|begin_of_text|>", "<|eot_id|>", True),
    "qwen-2.5": Family("qwen2", "gpt2", "qwen2", "qwen-2.5", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                       None, "<|im_end|>", False, ["<tool_call>", "</tool_call>"]),
    "qwen-3": Family("qwen3", "gpt2", "qwen2", "qwen-3", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                     None, "<|im_end|>", False, ["<tool_call>", "</tool_call>", "<think>", "</think>"]),
    "mistral-nemo": Family("llama", "gpt2", "tekken", "mistral-nemo",
                           ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                            "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"], "<s>", "</s>", True),
    "mistral-7b": Family("llama", "llama", "default", "mistral-nemo", ["<s>", "</s>", "[INST]", "[/INST]"],
                         "<s>", "</s>", True),
}


def _byte_level_vocabulary(family: Family) -> tuple[list[str], list[int], list[str]]:
    """Tokens in GPT-2's byte spelling (as llama.cpp stores them), their types, and the merges, from a
    byte-level BPE trained with the family's split; specials last, as in Llama 3 and Qwen."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([  # transformers' split table, not conveyor's
        pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[family.pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    added = family.control + family.user_defined
    backend.train_from_iterator(TRAINING_TEXT, trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(added), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    learned = json.loads(backend.to_str())["model"]
    tokens = sorted(learned["vocab"], key=learned["vocab"].get)
    merges = [" ".join(pair) for pair in learned["merges"]]
    tokens += added
    types = [NORMAL] * (len(tokens) - len(added)) + [CONTROL] * len(family.control) + [USER_DEFINED] * len(
        family.user_defined)
    return tokens, types, merges


def _sentencepiece_vocabulary(family: Family) -> tuple[list[str], list[int], list[float]]:
    """Llama 2 / Mistral 7B's layout: <unk>, the specials, 256 byte-fallback tokens, then pieces spelled
    with U+2581, scored by merge order (the file carries scores, not merges)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    head = ["<unk>", *family.control, *(f"<0x{b:02X}>" for b in range(256))]
    backend.train_from_iterator(TRAINING_TEXT, trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(head), limit_alphabet=60, show_progress=False))
    learned = json.loads(backend.to_str())["model"]["vocab"]
    pieces = sorted(learned, key=learned.get)
    tokens = head + pieces
    types = [UNKNOWN] + [CONTROL] * len(family.control) + [BYTE] * 256 + [NORMAL] * len(pieces)
    scores = [0.0] * len(head) + [-float(rank) for rank in range(len(pieces))]
    return tokens, types, scores


def _tokenizer_metadata(family: Family) -> Callable[[gguf.GGUFWriter], None]:
    def write(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(family.model)
        writer.add_tokenizer_pre(family.pre)
        if family.model == "gpt2":
            tokens, types, merges = _byte_level_vocabulary(family)
            writer.add_token_merges(merges)
        else:
            tokens, types, scores = _sentencepiece_vocabulary(family)
            writer.add_token_scores(scores)
        assert len(tokens) <= VOCAB_SIZE
        tokens += [f"<|reserved_{i}|>" for i in range(VOCAB_SIZE - len(tokens))]  # the model's full width
        types += [CONTROL] * (VOCAB_SIZE - len(types))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        if family.bos is not None:
            writer.add_bos_token_id(tokens.index(family.bos))
        writer.add_eos_token_id(tokens.index(family.eos))
        writer.add_add_bos_token(family.add_bos)
        writer.add_chat_template((TEMPLATES / f"{family.template}.jinja").read_text())
    return write


@pytest.fixture(scope="module")
def gguf_files(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf_families")
    files = {}
    for name, family in FAMILIES.items():
        (root / name).mkdir()
        files[name] = root / name / f"{name}.gguf"
        write_gguf(tiny_model_dirs[family.weights], files[name], family.arch, _tokenizer_metadata(family))
    return files


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_CACHE_DIR", str(tmp_path / "cache"))


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Écris `x = 1` 🤖 数字 1234"}]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_ids_equal_transformers_for_text_and_chat(name: str, gguf_files: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    path = gguf_files[name]
    ours = load_tokenizer(str(path))
    assert_same_ids_as_transformers(ours, path.parent, gguf_file=path.name)
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert ours.chat_template == reference.chat_template == (TEMPLATES / f"{FAMILIES[name].template}.jinja").read_text()
    assert ours.encode_chat(CHAT) == reference.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                                                   return_dict=False)
    vocabulary_used = {i for text in CORPUS for i in ours.encode(text)}
    assert len(vocabulary_used) > 100  # the trained merges are exercised, not only single bytes


@pytest.mark.parametrize(("name", "stops"), [
    ("llama-3", {"<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"}),
    ("qwen-3", {"<|im_end|>", "<|endoftext|>"}),
    ("mistral-7b", {"</s>"}),
])
def test_a_chat_model_stops_at_the_end_of_its_turn(name: str, stops: set[str], gguf_files: dict[str, Path]) -> None:
    """EOS and every end-of-turn control token llama.cpp stops on, whichever the file names EOS."""
    ours = load_tokenizer(str(gguf_files[name]))
    assert {ours.backend.id_to_token(i) for i in ours.eos_token_ids} == stops


def test_one_gguf_file_serves_a_chat(gguf_files: dict[str, Path]) -> None:
    """Model, tokenizer and chat template all from the one file, as `conveyor serve --model x.gguf` runs."""
    llm = LLM(str(gguf_files["qwen-3"]), num_kv_blocks=64, dtype="float32")
    tokenizer = llm.engine.tokenizer
    prompt: Any = tokenizer.encode_chat(CHAT, chat_template_kwargs={"enable_thinking": False})
    assert tokenizer.decode(prompt, skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    output = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    # Random weights end on half a UTF-8 character at times: the stream holds it back, never garbles it.
    assert len(output.token_ids) == 8 and tokenizer.decode(output.token_ids).startswith(output.text)
