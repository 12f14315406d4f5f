from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_model_dir

# Keep tests off any model hub, and keep caches of the test run in one place.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_ARCHITECTURES = ["gemma3", "llama", "qwen2", "qwen3"]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_tiny_model_dir(arch, root / arch) for arch in TINY_ARCHITECTURES}
