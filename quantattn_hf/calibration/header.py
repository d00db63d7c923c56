"""Reading and rewriting a safetensors header, with `CalibrationError`s that say what is wrong with the file.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor entries and an
optional string-to-string `__metadata__`), then the tensor bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .schema import CalibrationError, is_str_mapping

MAX_HEADER_BYTES = 100_000_000


def parse_header(data: bytes, data_len: int | None = None, where: str = "header") -> dict[str, str]:
    """The `__metadata__` of a header's bytes; checks its JSON and that every tensor lies within `data_len` bytes."""
    try:
        header = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CalibrationError(f"{where}: corrupted safetensors header (not valid JSON: {str(exc)[:120]})") from None
    if not isinstance(header, dict):
        raise CalibrationError(f"{where}: corrupted safetensors header (a JSON {type(header).__name__}, not an object)")
    metadata = header.get("__metadata__", {})
    if not is_str_mapping(metadata):
        raise CalibrationError(f"{where}: corrupted safetensors header (__metadata__ is not string to string)")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise CalibrationError(f"{where}: corrupted safetensors header (tensor {name[:80]!r} has no valid offsets)")
        if data_len is not None and offsets[1] > data_len:
            raise CalibrationError(
                f"{where}: truncated file (tensor {name[:80]!r} ends at byte {offsets[1]} of the data, "
                f"the file holds {data_len})"
            )
    return metadata


def _read_raw_header(path: Path) -> tuple[bytes, int, int]:
    """(header bytes, header length, file size) of a safetensors file, checking the length prefix."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CalibrationError(
                    f"{path}: truncated file ({size} bytes; a safetensors file starts with an 8-byte header length)"
                )
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES:
                raise CalibrationError(f"{path}: corrupted safetensors header (claims {n} bytes, over the limit)")
            if 8 + n > size:
                raise CalibrationError(f"{path}: truncated header (claims {n} bytes, the file has {size - 8} after it)")
            return f.read(n), n, size
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read ({exc.strerror or exc})") from None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (empty if it has none)."""
    path = Path(path)
    raw, n, size = _read_raw_header(path)
    return parse_header(raw, size - 8 - n, where=str(path))


def update_metadata(path: str | os.PathLike, entries: dict[str, str]) -> None:
    """Add `entries` to a safetensors file's metadata in place; the tensor bytes are copied unchanged."""
    path = Path(path)
    raw, n, size = _read_raw_header(path)
    parse_header(raw, size - 8 - n, where=str(path))
    header: dict[str, Any] = json.loads(raw.decode("utf-8"))
    header["__metadata__"] = {**header.get("__metadata__", {}), **entries}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, path.open("rb") as src:
            out.write(len(text).to_bytes(8, "little"))
            out.write(text)
            src.seek(8 + n)
            shutil.copyfileobj(src, out, 1 << 24)
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
