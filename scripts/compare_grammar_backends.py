"""Compare llguidance and xgrammar on this CPU with the default model's tokenizer (Gemma 3, 262k vocab):
tokenizer setup, schema compile time, and per-token mask time while walking a valid JSON output.

Run: PYTHONPATH=/path/with/xgrammar:$PWD python scripts/compare_grammar_backends.py
(xgrammar is not a conveyor dependency; install it into a scratch --target directory to run this.)
"""

from __future__ import annotations

import json
import statistics
import time

import llguidance
import llguidance.torch
import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerFast

from conveyor.model.loader import default_model_path
from conveyor.tokenizer import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                    "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "tags", "address", "role"],
    "additionalProperties": False,
}
OUTPUT = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "engines"],
                     "address": {"city": "London", "zip": "12345"}, "role": "admin"})


def timed(fn):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def main() -> None:
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(default_model_path())
    ids = tokenizer.encode(OUTPUT, add_special_tokens=False)
    vocab = tokenizer.vocab_size
    eos = tokenizer.eos_token_ids
    print(f"vocab {vocab}, walk of {len(ids)} tokens, torch threads 1")

    # llguidance
    ll_tok, t_tok = timed(lambda: llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab, eos_token=eos))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    compile_times = []
    for _ in range(5):
        matcher, t = timed(lambda: llguidance.LLMatcher(ll_tok, grammar))
        compile_times.append(t)
    assert not matcher.is_error(), matcher.get_error()
    mask = llguidance.torch.allocate_token_bitmask(1, ll_tok.vocab_size)
    mask_times = []
    for token in ids:
        _, t = timed(lambda: llguidance.torch.fill_next_token_bitmask(matcher, mask, 0))
        mask_times.append(t)
        assert matcher.consume_token(token), "llguidance rejected a valid token"
    print(f"llguidance {llguidance.__version__}: tokenizer {t_tok * 1e3:.0f} ms, compile median "
          f"{statistics.median(compile_times) * 1e3:.2f} ms (first {compile_times[0] * 1e3:.2f}), mask per token "
          f"median {statistics.median(mask_times) * 1e6:.0f} us, p90 "
          f"{sorted(mask_times)[int(len(mask_times) * 0.9)] * 1e6:.0f} us, max {max(mask_times) * 1e6:.0f} us")

    # xgrammar
    def xgr_info() -> xgr.TokenizerInfo:
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
        return xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=eos)

    info, t_tok = timed(xgr_info)
    compile_times = []
    for _ in range(5):
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        compiled, t = timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA)))
        compile_times.append(t)
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    mask_times = []
    for token in ids:
        _, t = timed(lambda: matcher.fill_next_token_bitmask(bitmask, 0))
        mask_times.append(t)
        assert matcher.accept_token(token), "xgrammar rejected a valid token"
    print(f"xgrammar 0.2.8: tokenizer {t_tok * 1e3:.0f} ms, compile median "
          f"{statistics.median(compile_times) * 1e3:.2f} ms (first {compile_times[0] * 1e3:.2f}), mask per token "
          f"median {statistics.median(mask_times) * 1e6:.0f} us, p90 "
          f"{sorted(mask_times)[int(len(mask_times) * 0.9)] * 1e6:.0f} us, max {max(mask_times) * 1e6:.0f} us")


if __name__ == "__main__":
    main()
