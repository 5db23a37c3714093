"""The data sets shipped inside the package, loaded without any network access.

The arrays are derived from the raw sources by ``scripts/derive_data.py`` (see its docstring for
exactly how) and stored as ``.npz`` files in ``selfopt/tasks/data``. They are loaded with
``allow_pickle=False``: nothing in them can execute code.
"""
from __future__ import annotations

import functools
from importlib import resources
from typing import NamedTuple

import numpy as np

#: Names accepted by :func:`load_images` with their image side length.
IMAGE_DATASETS = {"fashion_mnist8": 8, "fashion_mnist16": 16, "digits8": 8}


class ImageData(NamedTuple):
    """A labelled image data set as uint8 arrays (images scaled to 0..255)."""

    train_images: np.ndarray  # (n_train, side, side) uint8
    train_labels: np.ndarray  # (n_train,) uint8, class ids 0..9
    test_images: np.ndarray  # (n_test, side, side) uint8
    test_labels: np.ndarray  # (n_test,) uint8


class TextData(NamedTuple):
    """A character corpus as uint8 ids with its vocabulary."""

    train_ids: np.ndarray  # (n_train,) uint8
    test_ids: np.ndarray  # (n_test,) uint8
    vocab: str


def _open(name: str) -> dict[str, np.ndarray]:
    path = resources.files("selfopt.tasks") / "data" / name
    with resources.as_file(path) as real_path, np.load(real_path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _pool2(images: np.ndarray) -> np.ndarray:
    """2x2 average pooling of a (n, s, s) uint8 array, rounded back to uint8."""
    n, s, _ = images.shape
    pooled = images.astype(np.float32).reshape(n, s // 2, 2, s // 2, 2).mean(axis=(2, 4))
    return np.round(pooled).astype(np.uint8)


@functools.cache
def load_images(name: str) -> ImageData:
    """Loads one of :data:`IMAGE_DATASETS`.

    Args:
      name: ``fashion_mnist16`` (30,000 train / 10,000 test), ``fashion_mnist8`` (the same
        images pooled to 8x8) or ``digits8`` (scikit-learn's digits, 1,500 / 297, rescaled from
        0..16 to 0..255).

    Returns:
      An :class:`ImageData` of uint8 arrays.
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image data set {name!r}; choose one of {sorted(IMAGE_DATASETS)}")
    if name.startswith("fashion_mnist"):
        raw = _open("fashion_mnist16.npz")
        if name == "fashion_mnist8":
            raw["train_images"] = _pool2(raw["train_images"])
            raw["test_images"] = _pool2(raw["test_images"])
    else:
        raw = _open("digits8.npz")
        for k in ("train_images", "test_images"):
            raw[k] = np.round(raw[k].astype(np.float32) * (255.0 / 16.0)).astype(np.uint8)
    return ImageData(raw["train_images"], raw["train_labels"], raw["test_images"], raw["test_labels"])


@functools.cache
def load_text(name: str = "tinyshakespeare") -> TextData:
    """Loads the tiny Shakespeare corpus (90% train, 10% test) as character ids."""
    if name != "tinyshakespeare":
        raise ValueError(f"unknown text data set {name!r}; only 'tinyshakespeare' is shipped")
    raw = _open("tinyshakespeare.npz")
    return TextData(raw["train_ids"], raw["test_ids"], "".join(map(chr, raw["vocab"])))
