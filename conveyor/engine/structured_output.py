"""Structured output: a constraint (JSON schema, any JSON object, regex, choice list or Lark grammar)
compiled with llguidance, one matcher per sequence. Before each sampled position the matcher writes the
set of allowed tokens as a bitmask (one bit per vocabulary entry, 32 to an int32); after it the sampled
token advances it. Why llguidance and not xgrammar is measured in docs/serving.md.

Compiling happens once per distinct constraint (cached by `StructuredOutputsParams.key`) and, in the
server, in a worker thread before the request reaches the engine, so the engine's step only copies a
compiled matcher. The matcher lives with the runner's copy of the request, which keeps every token through
a preemption (recompute only refills the KV cache), so the grammar state always matches the tokens kept.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import llguidance
import torch

from conveyor.sampling_params import StructuredOutputsParams
from conveyor.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# JSON written as `json.dumps` writes it (", " and ": ", no other whitespace): tokens a model knows, and
# a small model cannot wander off into endless whitespace.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarCompiler:
    """Compiles constraints into llguidance matchers for one tokenizer; safe to call from several threads."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int],
                 cache_size: int = 256) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width: the bitmask covers it (ids beyond the tokenizer: never)
        self.eos_token_ids = eos_token_ids
        self.cache_size = cache_size
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        # NOTE: built on first use (seconds for a 262k vocabulary), so that servers nobody asks for
        # structured output from start as fast as before.
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                                            eos_token=self.eos_token_ids)
            return self._ll_tokenizer

    @property
    def bitmask_width(self) -> int:
        return (self.vocab_size + 31) // 32

    def compile(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The compiled matcher for `spec` (cached; do not advance it: `new_matcher` copies it). Raises
        ValueError, naming the problem, for a constraint that cannot be compiled."""
        key = spec.key()
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar_text(spec), log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid {key[0]} constraint: {matcher.get_error()}")
        with self._lock:
            self._compiled[key] = matcher
            if len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return matcher

    def new_matcher(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A fresh matcher of its own for one sequence."""
        return self.compile(spec).deep_copy()

    def fill_bitmask(self, matcher: llguidance.LLMatcher) -> torch.Tensor:
        """The tokens `matcher` allows next, as an int32 bitmask [ceil(vocab / 32)]."""
        bitmask = torch.zeros(self.bitmask_width, dtype=torch.int32)
        matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * bitmask.element_size())
        return bitmask


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar of a constraint."""
    if spec.json is not None or spec.json_object:
        schema = spec.json if spec.json is not None else {"type": "object"}
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)  # type: ignore[arg-type]
        except ValueError as error:
            raise ValueError(f"invalid json constraint: {error}") from None
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        return llguidance.grammar_from("choice", spec.choice)  # type: ignore[arg-type]
    return llguidance.grammar_from("grammar", str(spec.grammar))


def unpack_bitmasks(bitmasks: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, ceil(vocab / 32)] int32 bitmasks -> [rows, vocab] bool, True where a token is allowed."""
    bits = (bitmasks.unsqueeze(-1) >> _BIT_SHIFTS.to(bitmasks.device)) & 1
    return bits.view(bitmasks.shape[0], -1)[:, :vocab_size].bool()
