"""Reading safetensors files without torch: the header, and a finiteness check of the values.

The format: 8 bytes little-endian header length N, N bytes of JSON (``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}``), then the tensor data, offsets relative to
its start. Everything here treats the file as untrusted: header size, JSON, dtypes, shapes and
offsets are all checked against each other and against the file size.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidAdapterError

MAX_HEADER_BYTES = 100 * 1024 * 1024

# dtype -> bytes per element
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offset of the data, relative to the start of the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class TensorFile:
    path: Path
    data_start: int  # absolute byte offset of the data section
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: Path) -> TensorFile:
    """Parse and check a safetensors header; raises InvalidAdapterError naming the file."""
    label = path.name
    size = path.stat().st_size
    if size < 8:
        raise InvalidAdapterError(f"{label} is not a safetensors file: {size} bytes is shorter than its header")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or n < 2:
            raise InvalidAdapterError(f"{label} is not a safetensors file: header length {n} is not plausible")
        if 8 + n > size:
            raise InvalidAdapterError(f"{label} is truncated: header of {n} bytes but the file has {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapterError(f"{label} is not a safetensors file: header is not JSON ({exc})") from None
    except RecursionError:
        raise InvalidAdapterError(f"{label} is not a safetensors file: header is not JSON (maximum nesting depth exceeded)") from None
    if not isinstance(header, dict):
        raise InvalidAdapterError(f"{label} is not a safetensors file: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidAdapterError(f"{label}: __metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(label, name, entry)
    data_len = size - 8 - n
    _check_layout(label, tensors, data_len)
    return TensorFile(path=path, data_start=8 + n, tensors=tensors, metadata=metadata)


def _tensor_info(label: str, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise InvalidAdapterError(f"{label}: entry for tensor {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise InvalidAdapterError(f"{label}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidAdapterError(f"{label}: tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise InvalidAdapterError(f"{label}: tensor {name!r} has invalid data_offsets {offsets!r}")
    info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    if info.end - info.begin != info.numel * DTYPE_SIZES[dtype]:
        raise InvalidAdapterError(
            f"{label}: tensor {name!r} of shape {list(shape)} {dtype} needs {info.numel * DTYPE_SIZES[dtype]} "
            f"bytes but its offsets span {info.end - info.begin}"
        )
    return info


def _check_layout(label: str, tensors: dict[str, TensorInfo], data_len: int) -> None:
    """Tensors must tile the data section exactly: no overlap, no hole, nothing past the end."""
    pos = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != pos:
            what = "overlaps another tensor" if info.begin < pos else "leaves a gap before it"
            raise InvalidAdapterError(f"{label}: tensor {info.name!r} {what} (offset {info.begin}, expected {pos})")
        pos = info.end
    if pos > data_len:
        raise InvalidAdapterError(
            f"{label} is truncated: header declares {pos} bytes of tensor data but the file holds {data_len}"
        )
    if pos < data_len:
        raise InvalidAdapterError(f"{label}: {data_len - pos} trailing bytes after the last tensor")


def float_chunks(tf: TensorFile, chunk_elems: int = 1 << 22):
    """(tensor info, numpy float array) for every float tensor's data, in header order, read in chunks of at most
    ``chunk_elems`` values (numpy, no torch; bf16 widened to float32)."""
    import numpy as np

    with tf.path.open("rb") as f:
        for info in tf.tensors.values():
            if info.dtype not in FLOAT_DTYPES or info.numel == 0:
                continue
            item = DTYPE_SIZES[info.dtype]
            f.seek(tf.data_start + info.begin)
            remaining = info.numel
            while remaining:
                count = min(remaining, chunk_elems)
                yield info, _floats(np, f.read(count * item), info.dtype)
                remaining -= count


def non_finite_tensors(tf: TensorFile, chunk_elems: int = 1 << 22) -> list[str]:
    """Names of float tensors holding NaN or Inf."""
    import numpy as np

    bad: list[str] = []
    for info, values in float_chunks(tf, chunk_elems):
        if (not bad or bad[-1] != info.name) and not np.isfinite(values).all():
            bad.append(info.name)
    return bad


def _floats(np, buf: bytes, dtype: str):
    if dtype == "BF16":  # the top half of a float32
        return (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(buf, dtype={"F64": "<f8", "F32": "<f4", "F16": "<f2"}[dtype])
