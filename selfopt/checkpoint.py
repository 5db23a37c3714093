"""Checkpoints: pytrees of arrays in safetensors, everything else as JSON, written atomically.

One checkpoint is one ``.safetensors`` file (:mod:`selfopt.safe_io`: an atomic write, a
SHA-256 of the arrays and the metadata). Arrays are stored under their pytree paths
(``thetas['layers'][0]['w']``); JSON metadata (step, lineage ids, task configurations, schema
version) goes in the file's string metadata. Nothing is pickled, so loading a file cannot
execute code. A crash leaves either the old checkpoint or the new one, never half of one.

Loading needs a *template*: a pytree of the expected structure, shapes and dtypes (built from
the configuration). Every array must be present with the template's shape, else a one-line
``CheckpointError`` says which is missing or wrong.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from selfopt.checks import one_line
from selfopt.safe_io import FileCheckError, digest, read_checked, write_checked

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


def save_checkpoint(path: Path, tree: Any, metadata: dict[str, Any]) -> None:
    """Saves the arrays of ``tree`` and JSON-able ``metadata`` to ``path`` atomically.

    Raises:
      CheckpointError: the write failed (disk full, no permission); nothing is left at ``path``
        that was not there before, and no temporary file.
    """
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    arrays = {jax.tree_util.keystr(p): _to_numpy(x) for p, x in leaves}
    try:
        write_checked(path, arrays, "selfopt", metadata, with_meta=SCHEMA_VERSION >= 2,
                      schema_version=SCHEMA_VERSION)
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
    try:
        arrays, header = read_checked(path, "selfopt", "checkpoint")
    except FileCheckError as err:
        raise CheckpointError(str(err)) from None
    version = header.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} has schema version {one_line(version, 120)}; this selfopt "
                              f"reads versions {list(READABLE_VERSIONS)}")
    if header.get("sha256") != digest(arrays, header["meta"], with_meta=version >= 2):
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
