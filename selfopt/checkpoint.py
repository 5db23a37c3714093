"""Checkpoints: pytrees of arrays in safetensors, everything else as JSON, written atomically.

One checkpoint is one ``.safetensors`` file. Arrays are stored under their pytree paths
(``thetas['layers'][0]['w']``); JSON metadata (step, lineage ids, task configurations, schema
version, and a SHA-256 of the array bytes *and* of the metadata) goes in the file's string
metadata. Nothing is pickled, so loading a file cannot execute code. A file is written to a
temporary name in the same folder (``.NAME.tmp-PID``), flushed and fsync-ed, then renamed over
the final name (an atomic step on POSIX), and the folder is fsync-ed: a crash leaves either the
old checkpoint or the new one, never half of one, plus at most a temporary file that
:func:`remove_temp_files` clears. A failed write (a full disk) removes its temporary file and
leaves the previous checkpoint as it was.

Loading needs a *template*: a pytree of the expected structure, shapes and dtypes (built from
the configuration). Every array must be present with the template's shape, else a one-line
``CheckpointError`` says which is missing or wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from selfopt.checks import one_line

#: Version 2: the SHA-256 covers the metadata too (version 1: the arrays only; still read).
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)


class CheckpointError(Exception):
    """A checkpoint cannot be used (missing, damaged, from another configuration) or written."""


def warn(message: str) -> None:
    """One line on stderr: ``selfopt: warning: MESSAGE``."""
    print(f"selfopt: warning: {message}", file=sys.stderr, flush=True)


def _to_numpy(leaf: Any) -> np.ndarray:
    if jax.dtypes.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(leaf, order="C")  # (np.ascontiguousarray would make a scalar 1-d)


def _digest(arrays: dict[str, np.ndarray], meta: Any, version: int) -> str:
    """SHA-256 of the arrays (names and bytes) and, from version 2, of the metadata in canonical
    JSON (a flipped digit in a step count parses fine; only the checksum can tell)."""
    sha = hashlib.sha256()
    for name in sorted(arrays):
        sha.update(name.encode())
        sha.update(arrays[name].tobytes())
    if version >= 2:
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


def save_checkpoint(path: Path, tree: Any, metadata: dict[str, Any]) -> None:
    """Saves the arrays of ``tree`` and JSON-able ``metadata`` to ``path`` atomically.

    Raises:
      CheckpointError: the write failed (disk full, no permission); nothing is left at ``path``
        that was not there before, and no temporary file.
    """
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    arrays = {jax.tree_util.keystr(p): _to_numpy(x) for p, x in leaves}
    metadata = json.loads(json.dumps(metadata))  # the form a reader sees (tuples -> lists)
    header = {"schema_version": SCHEMA_VERSION,
              "sha256": _digest(arrays, metadata, SCHEMA_VERSION), "meta": metadata}
    try:
        atomic_write_bytes(path, save(arrays, metadata={"selfopt": json.dumps(header)}))
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err}; the "
                              "previous checkpoint is kept") from None


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, after checking its schema version and checksum.

    Raises:
      CheckpointError: missing, unreadable, damaged or of another schema version.
    """
    return _read(path)[1]


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        arrays = load_file(str(path))
        with open(path, "rb") as f:  # the header: 8-byte length, then JSON
            size = int.from_bytes(f.read(8), "little")
            header_json = json.loads(f.read(size))
        header = json.loads(header_json["__metadata__"]["selfopt"])
        if not isinstance(header, dict) or not isinstance(header.get("meta"), dict):
            raise ValueError("no selfopt header")
    except (SafetensorError, ValueError, KeyError, TypeError, OSError, RecursionError) as err:
        raise CheckpointError(f"{path} is not a readable selfopt checkpoint "
                              f"({one_line(err, 120)})") from None
    version = header.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} has schema version {one_line(version, 120)}; this selfopt "
                              f"reads versions {list(READABLE_VERSIONS)}")
    if header.get("sha256") != _digest(arrays, header["meta"], version):
        raise CheckpointError(f"{path} is damaged: its content does not match its checksum")
    return arrays, header["meta"]


def load_checkpoint(path: Path, template: Any) -> tuple[Any, dict[str, Any]]:
    """Loads a checkpoint into the structure of ``template``.

    Args:
      path: the ``.safetensors`` file.
      template: a pytree with the expected structure, shapes and dtypes (PRNG-key leaves are
        restored as keys).

    Returns:
      ``(tree, metadata)``.

    Raises:
      CheckpointError: unreadable, damaged, another schema version, or arrays that do not fit
        the template.
    """
    arrays, meta = _read(path)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    restored = []
    for p, like in leaves:
        name = jax.tree_util.keystr(p)
        if name not in arrays:
            raise CheckpointError(f"{path} lacks array {name}: it was saved by another "
                                  "configuration or architecture")
        value = arrays[name]
        is_key = jax.dtypes.issubdtype(jnp.result_type(like), jax.dtypes.prng_key)
        expected = _to_numpy(like)
        if value.shape != expected.shape or value.dtype != expected.dtype:
            raise CheckpointError(
                f"{path}: array {name} is {value.dtype}{list(value.shape)}, this configuration "
                f"needs {expected.dtype}{list(expected.shape)} (another architecture?)")
        restored.append(jax.random.wrap_key_data(value) if is_key else jnp.asarray(value))
    return jax.tree_util.tree_unflatten(treedef, restored), meta
