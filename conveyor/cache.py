"""The on-disk cache of derived artifacts (assembled model, dequantized weights, converted tokenizers)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """`$CONVEYOR_CACHE_DIR`, or ~/.cache/conveyor."""
    return Path(os.environ.get("CONVEYOR_CACHE_DIR", Path.home() / ".cache" / "conveyor"))


def file_fingerprint(path: str | Path, salt: str = "") -> str:
    """Size plus the first and last MiB: cheap (no full read of a large file), and it changes whenever
    the file's content does in practice (GGUF metadata sits at the start, tensors run to the end)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(f"{salt} {size}".encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:32]


def atomic_write_path(target: Path) -> Path:
    """A temporary sibling of `target` to write first and then `replace()` onto it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.with_name(f"{target.name}.tmp{os.getpid()}")
