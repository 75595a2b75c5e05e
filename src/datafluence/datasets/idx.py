"""Reader and writer for the idx format used by the official MNIST and Fashion-MNIST files.

The format is tiny: a big-endian magic number ``0x000008TD`` (``T=08`` for unsigned bytes,
``D`` the number of dimensions), ``D`` big-endian uint32 sizes, then the raw data. Only uint8
data is supported, which is all the (Fashion-)MNIST files use. Files may be gzip-compressed.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """Read a file, transparently decompressing gzip (detected by content, not by name)."""
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as exc:  # truncated or corrupt gzip stream
        raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from exc


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx file (``.gz`` or raw) into a uint8 array, checking header and length.

    Raises ValueError naming the file when the magic number is wrong or the data length does
    not match the sizes in the header, so a bad download fails loudly instead of silently.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: not an idx file (only {len(data)} bytes, no magic number)")
    zero, dtype_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype_code != _UBYTE or ndim == 0:
        raise ValueError(
            f"{path}: not a uint8 idx file (magic number 0x{data[:4].hex()}, expected "
            "0x00000801 for labels or 0x00000803 for images)"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"{path}: truncated idx header ({len(data)} of {header_len} bytes)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64))
    actual = len(data) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: idx file {what}: header says shape {shape} ({expected} bytes of data), "
            f"found {actual} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape).copy()


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a uint8 array as an idx file, gzip-compressed when the name ends with ``.gz``.

    Mainly for tests, which build tiny fake datasets in the official layout.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_idx supports uint8 arrays only, got {array.dtype}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"write_idx needs an array with 1 to 255 dimensions, got {array.ndim}")
    header = bytes([0, 0, _UBYTE, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    payload = header + np.ascontiguousarray(array).tobytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload)
    path.write_bytes(payload)
