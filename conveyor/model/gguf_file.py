"""A fast reader of GGUF files: metadata and tensor locations, tensor bytes memory-mapped.

Why not `gguf.GGUFReader`: it turns every array element of the metadata into its own numpy object, so a
262k-token vocabulary takes it 7-15 s to open, twice per start (weights and tokenizer). This reader
parses the same format in well under a second. Dequantization is still `gguf.quants`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (slowest first); GGUF stores the reverse
    qtype: GGMLQuantizationType
    offset: int  # from the start of the file


class GGUFFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self._map = np.memmap(path, dtype=np.uint8, mode="r")
        self._buffer = memoryview(self._map)
        self._pos = 0
        if bytes(self._buffer[:4]) != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        self._pos = 4
        version = self._read("<I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old (need 2 or later)")
        tensor_count, kv_count = self._read("<Q"), self._read("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._read_string()
            self.metadata[key] = self._read_value(self._read("<I"))
        infos = []
        for _ in range(tensor_count):
            name = self._read_string()
            dims = [self._read("<Q") for _ in range(self._read("<I"))]
            qtype, offset = GGMLQuantizationType(self._read("<I")), self._read("<Q")
            infos.append((name, tuple(reversed(dims)), qtype, offset))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = [TensorInfo(name, shape, qtype, data_start + offset) for name, shape, qtype, offset in infos]

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def tensor_bytes(self, info: TensorInfo) -> np.ndarray:
        """The tensor's raw data (read-only, memory-mapped), shaped as gguf.quants.dequantize expects."""
        block_size, type_size = GGML_QUANT_SIZES[info.qtype]
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        row_bytes = info.shape[-1] // block_size * type_size
        raw = self._map[info.offset: info.offset + rows * row_bytes]
        if info.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            dtype = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                     GGMLQuantizationType.BF16: np.uint16}[info.qtype]
            return raw.view(dtype).reshape(info.shape)
        return raw.reshape(*info.shape[:-1], row_bytes)

    # ---- parsing --------------------------------------------------------------------------------

    def _read(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self._buffer, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _read_string(self) -> str:
        length = self._read("<Q")
        text = bytes(self._buffer[self._pos:self._pos + length]).decode("utf-8", errors="replace")
        self._pos += length
        return text

    def _read_value(self, value_type: int) -> Any:
        if value_type in _SCALARS:
            return self._read(_SCALARS[value_type])
        if value_type == _STRING:
            return self._read_string()
        if value_type != _ARRAY:
            raise ValueError(f"{self.path}: unknown GGUF value type {value_type}")
        element_type, count = self._read("<I"), self._read("<Q")
        if element_type in _NUMPY:  # numbers: one numpy read for the whole array
            dtype = np.dtype(_NUMPY[element_type]).newbyteorder("<")
            values = np.frombuffer(self._buffer, dtype=dtype, count=count, offset=self._pos)
            self._pos += count * dtype.itemsize
            return values.tolist()
        return [self._read_value(element_type) for _ in range(count)]
