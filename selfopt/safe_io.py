"""Files that a crash cannot half-write and a flipped bit cannot pass: atomic writes, and
safetensors files with a checksummed JSON header. NumPy only, no JAX, so that the PyTorch
drop-in (:mod:`selfopt.torch`) reads the same files.

A file is written to a temporary name in the same folder (``.NAME.tmp-PID``), flushed and
fsync-ed, then renamed over the final name (an atomic step on POSIX), and the folder is
fsync-ed: a crash leaves either the old file or the new one, plus at most a temporary file that
:func:`remove_temp_files` clears. A failed write (a full disk) removes its temporary file and
leaves the previous file as it was.

A checked safetensors file holds named float arrays and, in its string metadata under one key,
``{"sha256": ..., "meta": {...}, **header fields}``; the SHA-256 covers the arrays (names and
bytes) and the metadata in canonical JSON (a flipped digit in a step count parses fine; only
the checksum can tell).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from selfopt.checks import one_line


class FileCheckError(Exception):
    """A checked file is missing, unreadable or damaged."""


def digest(arrays: dict[str, np.ndarray], meta: Any, with_meta: bool = True) -> str:
    """SHA-256 of the arrays (names and bytes, by name) and of ``meta`` in canonical JSON."""
    sha = hashlib.sha256()
    for name in sorted(arrays):
        sha.update(name.encode())
        sha.update(np.ascontiguousarray(arrays[name]).tobytes())
    if with_meta:
        sha.update(json.dumps(meta, sort_keys=True).encode())
    return sha.hexdigest()


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_temp_files(folder: Path, name_glob: str = "*") -> list[Path]:
    """Removes temporary files that writes of ``folder/NAME`` (NAME matching ``name_glob``) left
    behind when a crash cut them short. Only call it while holding the run's lock: a live
    writer's temporary file looks the same.

    Returns:
      The files removed.
    """
    removed = []
    for tmp in Path(folder).glob(f".{name_glob}.tmp-*"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def fsync_dir(path: Path) -> None:
    """Makes a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync folder)."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_checked(path: Path, arrays: dict[str, np.ndarray], key: str, meta: dict[str, Any],
                  with_meta: bool = True, **fields: Any) -> dict[str, Any]:
    """Writes ``arrays`` and the header ``{**fields, "sha256", "meta"}`` (under ``key``)
    atomically. ``meta`` must be JSON-able; it is stored as a reader will see it (tuples as
    lists). ``with_meta``: the checksum covers ``meta`` too (:func:`digest`).

    Returns:
      ``meta`` as stored.

    Raises:
      OSError: the write failed; nothing at ``path`` changed.
    """
    meta = json.loads(json.dumps(meta))
    header = {**fields, "sha256": digest(arrays, meta, with_meta), "meta": meta}
    atomic_write_bytes(path, save(arrays, metadata={key: json.dumps(header)}))
    return meta


def string_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (its header: an 8-byte length, then JSON).

    Raises:
      OSError, ValueError, KeyError, TypeError, RecursionError: not a readable safetensors
        header.
    """
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size < 100_000_000:
            raise ValueError(f"header length {size} is not a safetensors header's")
        return dict(json.loads(f.read(size)).get("__metadata__") or {})


def read_checked(path: Path, key: str, what: str
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and the header (under ``key``) of a file that :func:`write_checked` wrote.

    The checksum is *not* checked here (its scheme may depend on a version field of the
    header): call :func:`digest` and compare.

    Raises:
      FileCheckError: missing, not a safetensors file, or without a header under ``key``
        (``what`` names the expected kind of file in the message: "checkpoint").
    """
    path = Path(path)
    if not path.is_file():
        raise FileCheckError(f"no {what} at {path}")
    try:
        arrays = load_file(str(path))
        header = json.loads(string_metadata(path)[key])
        if not isinstance(header, dict) or not isinstance(header.get("meta"), dict):
            raise ValueError(f"no {key} header")
    except (SafetensorError, ValueError, KeyError, TypeError, OSError, RecursionError) as err:
        raise FileCheckError(f"{path} is not a readable selfopt {what} ({one_line(err, 120)})"
                             ) from None
    return arrays, header
