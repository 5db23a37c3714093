"""Derive the compact data sets that ship inside ``selfopt`` from the raw sources.

Run from the repository root (the raw files live in ``../shared/data`` during development):

    python scripts/derive_data.py --shared ../shared/data

Writes ``selfopt/tasks/data/{fashion_mnist16,digits8,tinyshakespeare}.npz``; the package reads
only these files at run time, so an installed ``selfopt`` needs no network and no ``../shared``.

* Fashion-MNIST (Zalando, MIT): 28x28 images are zero-padded to 32x32 (the background is 0) and
  average-pooled 2x2 to 16x16, rounded to uint8. The 8x8 variant is derived at load time by a
  further 2x2 average pool, so it is not stored twice. A fixed random subset of the training
  split is kept (see ``--fmnist-train``) to keep the wheel small; the whole test split is kept.
* scikit-learn's 8x8 digits (1,797 images, pixel values 0..16): shuffled with a fixed seed and
  split into train and test.
* tiny Shakespeare (public domain): characters mapped to ids over the sorted vocabulary; the
  first 90% is the training split, the rest the validation split.
"""
from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "selfopt" / "tasks" / "data"


def read_idx(path: Path) -> np.ndarray:
    """Reads a gzipped IDX file (the MNIST format) into a numpy array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def pool_to_16(images: np.ndarray) -> np.ndarray:
    """28x28 uint8 -> 16x16 uint8: pad to 32x32 with zeros, then 2x2 average pooling."""
    padded = np.pad(images.astype(np.float32), ((0, 0), (2, 2), (2, 2)))
    pooled = padded.reshape(-1, 16, 2, 16, 2).mean(axis=(2, 4))
    return np.round(pooled).astype(np.uint8)


def derive_fashion_mnist(shared: Path, n_train: int, seed: int) -> None:
    src = shared / "fashion-mnist"
    x_train = read_idx(src / "train-images-idx3-ubyte.gz")
    y_train = read_idx(src / "train-labels-idx1-ubyte.gz")
    x_test = read_idx(src / "t10k-images-idx3-ubyte.gz")
    y_test = read_idx(src / "t10k-labels-idx1-ubyte.gz")
    keep = np.sort(np.random.default_rng(seed).permutation(len(x_train))[:n_train])
    np.savez_compressed(
        OUT / "fashion_mnist16.npz",
        train_images=pool_to_16(x_train[keep]),
        train_labels=y_train[keep],
        test_images=pool_to_16(x_test),
        test_labels=y_test,
    )


def derive_digits(seed: int) -> None:
    from sklearn.datasets import load_digits  # development-only dependency

    digits = load_digits()
    images = digits.images.astype(np.uint8)  # (1797, 8, 8), values 0..16
    labels = digits.target.astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    n_train = 1500
    np.savez_compressed(
        OUT / "digits8.npz",
        train_images=images[order[:n_train]],
        train_labels=labels[order[:n_train]],
        test_images=images[order[n_train:]],
        test_labels=labels[order[n_train:]],
    )


def derive_shakespeare(shared: Path) -> None:
    text = (shared / "tinyshakespeare.txt").read_text(encoding="utf-8")
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = np.array([lookup[c] for c in text], dtype=np.uint8)
    split = int(0.9 * len(ids))
    np.savez_compressed(
        OUT / "tinyshakespeare.npz",
        train_ids=ids[:split],
        test_ids=ids[split:],
        vocab=np.array([ord(c) for c in vocab], dtype=np.int32),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--fmnist-train", type=int, default=30000,
                        help="training images of Fashion-MNIST to keep (of 60,000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    derive_fashion_mnist(args.shared, args.fmnist_train, args.seed)
    derive_digits(args.seed)
    derive_shakespeare(args.shared)
    for path in sorted(OUT.glob("*.npz")):
        print(f"{path.name}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
