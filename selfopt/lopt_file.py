"""The exported learned-optimizer file: one safetensors file that any selfopt, JAX or PyTorch,
can load (NumPy only here, no JAX).

Arrays: the weights ``theta`` under dotted paths (``layers.0.w``, ``cell.w_in``), float32.
Header (:mod:`selfopt.safe_io`, key ``selfopt.lopt``): ``format_version`` and a SHA-256 of the
arrays and the metadata. Metadata:

* ``architecture``: the learned optimizer's kind (``mlp``, ``scheduled``, ``hierarchical``) and
  ``config``, its fields; with the arrays, this is all a loader needs;
* ``training``: the run's provenance (command, commit, date), seed, configuration, outer steps,
  and which member's weights these are (the elite validated at step N);
* ``evaluation``: the run's evaluation against per-task tuned Adam, where there is one;
* ``exported``: the exporting selfopt's provenance.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from selfopt.checks import one_line
from selfopt.safe_io import FileCheckError, digest, read_checked, string_metadata, write_checked

#: The self-trained optimizer shipped with the package (its card: docs/pretrained.md).
PRETRAINED = Path(__file__).resolve().parent / "pretrained" / "selfopt-scheduled.safetensors"
#: The header's key in the safetensors metadata.
KEY = "selfopt.lopt"
#: Version 1: the first. A reader refuses a newer version (it may not know its fields).
FORMAT_VERSION = 1


class LOptFileError(ValueError):
    """An exported optimizer file cannot be used (missing, damaged, newer, another kind)."""


def flatten(theta: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"layers.0.w": array, ...}`` from nested dicts, lists and tuples of arrays."""
    if isinstance(theta, dict):
        items = theta.items()
    elif isinstance(theta, (list, tuple)):
        items = enumerate(theta)
    else:
        return {prefix: np.asarray(theta, np.float32, order="C")}
    out: dict[str, np.ndarray] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def unflatten(arrays: dict[str, Any]) -> Any:
    """The nested weights from :func:`flatten`'s names: a component of digits is a list index
    (lists are contiguous from 0), anything else a dict key."""
    root: dict[str, Any] = {}
    for name, value in arrays.items():
        node, parts = root, name.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def lists(node: Any, where: str) -> Any:
        if not isinstance(node, dict):
            return node
        if node and all(k.isdigit() for k in node):
            if sorted(int(k) for k in node) != list(range(len(node))):
                raise LOptFileError(f"array names under {where or 'the root'} skip an index")
            return [lists(node[str(i)], f"{where}.{i}") for i in range(len(node))]
        return {k: lists(v, f"{where}.{k}" if where else k) for k, v in node.items()}

    return lists(root, "")


def write(path: Path, theta: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """Writes ``theta`` (nested arrays) and ``meta`` (JSON-able, with ``architecture``)
    atomically; returns ``meta`` as stored (as :func:`read` will return it).

    Raises:
      OSError: the write failed; nothing at ``path`` changed.
    """
    return write_checked(Path(path), flatten(theta), KEY, meta, format_version=FORMAT_VERSION)


def _metadata_keys(path: Path) -> set[str]:
    """The keys of a safetensors file's string metadata (empty for anything else)."""
    try:
        return set(string_metadata(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return set()


def is_lopt_file(path: Path) -> bool:
    """Whether ``path`` is a safetensors file with an exported optimizer's header (damaged or
    not: :func:`read` says which); ``False`` for a training checkpoint or anything else."""
    return KEY in _metadata_keys(path)


def read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The flat arrays and the metadata of an exported file, checked.

    Raises:
      LOptFileError: missing, not an exported optimizer (a training checkpoint, another
        safetensors file), of a newer format version, damaged (checksum), or without an
        architecture.
    """
    try:
        arrays, header = read_checked(path, KEY, "optimizer file")
    except FileCheckError as err:
        hint = ("; it is a training checkpoint: export it with selfopt export RUN"
                if "selfopt" in _metadata_keys(path) else "")
        raise LOptFileError(f"{err}{hint}") from None
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise LOptFileError(f"{path} has no valid format version ({one_line(version, 60)})")
    if version > FORMAT_VERSION:
        raise LOptFileError(f"{path} has format version {version}, newer than this selfopt "
                            f"reads ({FORMAT_VERSION}): upgrade selfopt to load it")
    if header.get("sha256") != digest(arrays, header["meta"]):
        raise LOptFileError(f"{path} is damaged: its content does not match its checksum")
    arch = header["meta"].get("architecture")
    if not (isinstance(arch, dict) and isinstance(arch.get("kind"), str)
            and isinstance(arch.get("config"), dict)):
        raise LOptFileError(f"{path} does not name its architecture (metadata 'architecture')")
    return arrays, header["meta"]
