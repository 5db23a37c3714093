"""Checkpoints: pytrees of arrays in safetensors, everything else as JSON, written atomically.

One checkpoint is one ``.safetensors`` file. Arrays are stored under their pytree paths
(``thetas['layers'][0]['w']``); JSON metadata (step, lineage ids, task configurations, schema
version, and a SHA-256 of the array bytes) goes in the file's string metadata. Nothing is
pickled, so loading a file cannot execute code. A file is written to a temporary name in the same
folder, flushed and fsync-ed, then renamed over the final name (an atomic step on POSIX), and the
folder is fsync-ed: a crash leaves either the old checkpoint or the new one, never half of one.

Loading needs a *template*: a pytree of the expected structure, shapes and dtypes (built from
the configuration). Every array must be present with the template's shape, else a one-line
``CheckpointError`` says which is missing or wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

SCHEMA_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint cannot be used: missing, damaged, or from another configuration."""


def _to_numpy(leaf: Any) -> np.ndarray:
    if jax.dtypes.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.ascontiguousarray(np.asarray(leaf))


def _digest(arrays: dict[str, np.ndarray]) -> str:
    sha = hashlib.sha256()
    for name in sorted(arrays):
        sha.update(name.encode())
        sha.update(arrays[name].tobytes())
    return sha.hexdigest()


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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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
    """Saves the arrays of ``tree`` and JSON-able ``metadata`` to ``path`` atomically."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    arrays = {jax.tree_util.keystr(p): _to_numpy(x) for p, x in leaves}
    header = {"schema_version": SCHEMA_VERSION, "sha256": _digest(arrays), "meta": metadata}
    atomic_write_bytes(path, save(arrays, metadata={"selfopt": json.dumps(header)}))


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, after checking its schema version and checksum."""
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
    except (SafetensorError, ValueError, KeyError, TypeError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable selfopt checkpoint ({err})") from None
    if header.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(f"{path} has schema version {header.get('schema_version')!r}; "
                              f"this selfopt reads version {SCHEMA_VERSION}")
    if header.get("sha256") != _digest(arrays):
        raise CheckpointError(f"{path} is damaged: its arrays do not match their checksum")
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
