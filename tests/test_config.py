"""EngineConfig: flags generated from its fields, validation, and derived defaults resolved in one place."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

import conveyor.config
from conveyor.config import DEFAULT_MAX_MODEL_LEN, EngineConfig, ModelConfig, machine_precision


def _model(max_positions: int = 32768) -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2,
                       num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6, rope_theta=1e4,
                       max_position_embeddings=max_positions)


def test_every_knob_has_a_flag_with_its_help_and_the_flags_round_trip() -> None:
    parser = argparse.ArgumentParser()
    EngineConfig.add_cli_args(parser)
    flags = {action.dest: action for action in parser._actions if action.dest != "help"}
    knobs = {f.name for f in dataclasses.fields(EngineConfig) if f.metadata["cli"]}
    assert set(flags) == knobs | {"config"} and "enable_step_trace" not in flags
    assert all(flags[name].help for name in knobs)
    args = parser.parse_args(["--max-num-seqs", "8", "--kv-cache-memory", "1GiB", "--quantization", "int8"])
    config = EngineConfig.from_cli_args(args, enable_step_trace=False)
    assert (config.max_num_seqs, config.kv_cache_memory, config.quantization) == (8, "1GiB", "int8")
    assert config.enable_step_trace is False and config.max_num_batched_tokens == EngineConfig().max_num_batched_tokens
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-num-seqs", "many"])


@pytest.mark.parametrize("bad", [dict(max_num_seqs=0), dict(num_kv_blocks=0), dict(max_model_len=1),
                                 dict(dtype="float64"), dict(quantization="int4"), dict(kv_cache_memory="lots")])
def test_bad_values_are_refused_with_the_name(bad: dict) -> None:
    name = next(iter(bad))
    with pytest.raises(ValueError, match="memory size" if name == "kv_cache_memory" else name):
        EngineConfig(**bad)


def test_configs_are_immutable_and_resolution_fills_every_derived_default() -> None:
    config = EngineConfig(block_size=4, kv_cache_memory="1MiB", dtype="float32")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_num_seqs = 2  # type: ignore[misc]
    resolved = config.resolved("/models/m.gguf", _model())
    assert resolved.model == resolved.tokenizer == "/models/m.gguf"
    assert resolved.max_model_len == DEFAULT_MAX_MODEL_LEN and resolved.num_threads and resolved.num_threads >= 1
    bytes_per_block = 2 * 2 * 1 * 4 * 4 * 4  # K and V, 2 layers, 1 KV head, head_dim 4, fp32, 4 tokens
    assert resolved.num_kv_blocks == 2**20 // bytes_per_block
    assert config.resolved("m", _model(max_positions=512)).max_model_len == 512
    with pytest.raises(ValueError, match="exceeds the model's limit of 512"):
        EngineConfig(max_model_len=1024).resolved("m", _model(max_positions=512))
    with pytest.raises(ValueError, match="holds no block"):
        EngineConfig(kv_cache_memory=100).resolved("m", _model())


@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}, ("bfloat16", None)),
    ({"avx2", "amx_bf16", "amx_int8"}, ("bfloat16", None)),
    ({"avx2", "avx512f", "avx512_vnni"}, ("float32", None)),
    ({"avx2", "fma"}, ("float32", None)),
    (set(), ("float32", None)),
])
def test_dtype_auto_picks_the_fastest_mode_within_llama_cpps_error_by_cpu_flags(
        monkeypatch: pytest.MonkeyPatch, flags: set[str], expected: tuple[str, str | None]) -> None:
    monkeypatch.setattr(conveyor.config, "cpu_flags", lambda: frozenset(flags))
    assert machine_precision("cpu")[:2] == expected
    resolved = EngineConfig(block_size=4, kv_cache_memory="1MiB").resolved("m", _model())
    assert (resolved.dtype, resolved.quantization) == expected
    bytes_per_block = 2 * 2 * 1 * 4 * 4 * (2 if expected[0] == "bfloat16" else 4)
    assert resolved.num_kv_blocks == 2**20 // bytes_per_block


def test_dtype_auto_gives_way_to_what_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conveyor.config, "cpu_flags", lambda: frozenset({"avx512_vnni", "avx512_bf16"}))
    assert EngineConfig(dtype="float32").precision()[:2] == ("float32", None)  # the exact model
    assert EngineConfig(quantization="int8").precision()[:2] == ("bfloat16", "int8")  # int8 over bf16
    assert EngineConfig(quantization="int8", dtype="float32").precision()[:2] == ("float32", "int8")
    assert EngineConfig(quantization="int8-fast").precision()[:2] == ("float32", "int8-fast")
    assert EngineConfig(device="cuda").precision()[:2] == ("float32", None)
    assert EngineConfig().precision()[:2] == ("bfloat16", None)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    EngineConfig.add_cli_args(parser)
    return parser.parse_args(list(argv))


def test_a_config_file_sets_knobs_under_the_flags_given(tmp_path) -> None:
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"max_num_seqs": 16, "max_num_batched_tokens": 256, "prefill_chunk_share": 2,
                                "enable_prefix_caching": False, "kv_cache_memory": "512MiB"}))
    config = EngineConfig.from_cli_args(_parse("--config", str(path), "--max-num-seqs", "64"))
    # NOTE: 64 is also the default: a flag given on the command line wins even when it repeats the default.
    assert (config.max_num_seqs, config.max_num_batched_tokens, config.prefill_chunk_share) == (64, 256, 2)
    assert config.enable_prefix_caching is False and config.kv_cache_memory == "512MiB"
    assert EngineConfig.from_file(path) == EngineConfig(max_num_seqs=16, max_num_batched_tokens=256,
                                                        prefill_chunk_share=2, enable_prefix_caching=False,
                                                        kv_cache_memory="512MiB")
    assert EngineConfig.from_cli_args(_parse()) == EngineConfig()


@pytest.mark.parametrize("content, message", [
    ({"max_num_seq": 8}, "unknown key 'max_num_seq'"),
    ({"max_num_seqs": 0}, "max_num_seqs must be at least 1"),
    ({"prefill_chunk_share": -1}, "prefill_chunk_share must be at least 1"),
    ({"max_num_batched_tokens": "1024"}, "max_num_batched_tokens must be int"),
    ({"block_size": True}, "block_size must be int"),
    ({"dtype": "float64"}, "dtype must be"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_config_files_are_refused_naming_the_key(tmp_path, content: object, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as error:
        EngineConfig.from_file(path)
    assert str(path) in str(error.value)


def test_a_config_file_that_is_not_json_is_refused(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("max_num_seqs: 8")
    with pytest.raises(ValueError, match="bad.json"):
        EngineConfig.from_file(path)
