"""Image classifiers trained with softmax cross-entropy: logistic regression, MLPs, convnets.

The data set (uint8 images and labels, on the device) is a leaf of the task, and so is the
activation (an index into :data:`ACTIVATIONS`), so every classifier of one architecture, image
side and batch size shares compiled code whatever its data set and nonlinearity. Data sets of
one image side (``fashion_mnist8`` and ``digits8``) have one array shape: each split is
zero-padded to the largest row count of its side, and its true row count ``n`` is a leaf;
batches draw row indices uniformly from ``[0, n)`` with replacement (:func:`sample_images`), so
the padding rows are never read. Images are scaled to float32 in [0, 1]. Weights use
LeCun-normal initialisation (variance 1 / fan-in), biases zeros.

Padded batches **(ours)**: with ``pad_batch_to=R`` a task draws ``R`` examples per batch and
its loss is the mean over the first ``batch_size`` of them. The batch size is then an array
(a leaf), not part of the shape, so classifiers that differ only in batch size share one
compiled program: the training distribution can vary the gradient noise without paying a
compilation per batch size.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfopt.tasks.base import SPLITS, Task, static_field, task_dataclass
from selfopt.tasks.datasets import IMAGE_DATASETS, ImageData, load_images

NUM_CLASSES = 10

#: Hidden-layer nonlinearities by name; a task holds the index of its own in this order.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "elu": jax.nn.elu,
}


class ImageSplit(NamedTuple):
    """One split of a data set on the device, zero-padded to the row count of its image side."""

    images: jax.Array  # (padded rows, side, side) uint8
    labels: jax.Array  # (padded rows,) uint8
    count: jax.Array  # () int32: the split's examples, the first ``count`` rows


def split_arrays(data: ImageData, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of one split of ``data``."""
    return data[:2] if split == "train" else data[2:]


@functools.cache
def device_images(name: str) -> dict[str, ImageSplit]:
    """:func:`load_images` moved to the device once, shared by every task that uses it.

    Each split's arrays are zero-padded to the largest row count of that split among the data
    sets of the same image side, so all of them have one shape.

    Returns:
      ``{split: ImageSplit}`` for each of ``SPLITS``.
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(f"dataset must be one of {sorted(IMAGE_DATASETS)}, got {name!r}")
    same_side = [load_images(other) for other, side in IMAGE_DATASETS.items()
                 if side == IMAGE_DATASETS[name]]
    splits = {}
    for split in SPLITS:
        rows = max(len(split_arrays(data, split)[0]) for data in same_side)
        images, labels = split_arrays(load_images(name), split)
        padding = rows - len(images)
        splits[split] = ImageSplit(
            jnp.asarray(np.pad(images, ((0, padding), (0, 0), (0, 0)))),
            jnp.asarray(np.pad(labels, (0, padding))),
            jnp.asarray(len(images), jnp.int32))
    return splits


def check_positive_int(name: str, value: int) -> int:
    """Validates a size field (a width, a batch size)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_widths(name: str, widths) -> tuple[int, ...]:
    """Validates layer widths (a list from JSON is fine) and returns them as a tuple."""
    if isinstance(widths, (str, int)):
        raise ValueError(f"{name} must be a sequence of positive ints, got {widths!r}")
    return tuple(check_positive_int(name, w) for w in widths)


def check_padding(batch_size: int, pad_batch_to: int) -> int:
    """Validates ``pad_batch_to`` (0: no padding, else at least ``batch_size``); returns the
    number of rows a batch draws."""
    if not isinstance(pad_batch_to, int) or isinstance(pad_batch_to, bool) or (
            pad_batch_to and pad_batch_to < batch_size) or pad_batch_to < 0:
        raise ValueError(f"pad_batch_to must be 0 (no padding) or an int >= batch_size "
                         f"({batch_size}), got {pad_batch_to!r}")
    return pad_batch_to or batch_size


def activation_index(activation: str) -> jax.Array:
    """Validates an activation name; returns its index in :data:`ACTIVATIONS` (int32 scalar)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return jnp.asarray(list(ACTIVATIONS).index(activation), jnp.int32)


def activate(index: jax.Array, x: jax.Array) -> jax.Array:
    """The ``index``-th of :data:`ACTIVATIONS` applied to ``x`` (only that one is evaluated)."""
    return jax.lax.switch(index, tuple(ACTIVATIONS.values()), x)


def sample_images(data: dict[str, ImageSplit], key: jax.Array, split: str,
                  batch_size: int) -> tuple[jax.Array, jax.Array]:
    """Draws ``batch_size`` examples of ``split`` with replacement: row indices uniform in
    ``[0, count)``, so never a padding row.

    Returns:
      ``(images, labels)``: float32 ``(batch_size, side, side)`` in [0, 1] and int32 labels.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels, count = data[split]
    index = jax.random.randint(key, (batch_size,), 0, count)
    return images[index].astype(jnp.float32) / 255.0, labels[index].astype(jnp.int32)


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> list[dict[str, jax.Array]]:
    """Dense layers mapping ``sizes[0] -> sizes[1] -> ... -> sizes[-1]``."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.nn.initializers.lecun_normal()(k, (n_in, n_out)), "b": jnp.zeros(n_out)}
            for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:])]


def apply_mlp(layers: list[dict[str, jax.Array]], x: jax.Array,
              activation: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Applies the layers of :func:`init_mlp`, with ``activation`` between them (not after)."""
    for i, layer in enumerate(layers):
        x = x @ layer["w"] + layer["b"]
        if i < len(layers) - 1:
            x = activation(x)
    return x


@task_dataclass
class ImageClassifier(Task):
    """Shared data handling and loss; subclasses define ``init`` and ``logits``."""

    data: dict[str, ImageSplit]  # the data set's splits (see device_images)
    batch_size: jax.Array  # int32 scalar: the examples of a batch that count in its loss
    batch_rows: int = static_field()  # examples drawn per batch (batch_size, or the padding)
    padded: bool = static_field()  # whether the loss masks rows beyond batch_size

    loss_floor = 0.0

    @classmethod
    def batch_fields(cls, batch_size: int, pad_batch_to: int) -> dict:
        """The batch fields of a task (checked)."""
        batch_size = check_positive_int("batch_size", batch_size)
        rows = check_padding(batch_size, pad_batch_to)
        return {"batch_size": jnp.asarray(batch_size, jnp.int32), "batch_rows": rows,
                "padded": bool(pad_batch_to)}

    def sample_batch(self, key: jax.Array, split: str = "train") -> tuple[jax.Array, jax.Array]:
        """``(images, labels)``, ``batch_rows`` of them, drawn with replacement; see
        :func:`sample_images`."""
        return sample_images(self.data, key, split, self.batch_rows)

    def logits(self, params, images: jax.Array) -> jax.Array:
        """Class scores ``(batch, 10)`` for images ``(batch, side, side)``."""
        raise NotImplementedError

    def loss(self, params, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        """Mean softmax cross-entropy (over the first ``batch_size`` rows when padded)."""
        images, labels = batch
        logits = self.logits(params, images)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        if not self.padded:
            return losses.mean()
        counted = jnp.arange(losses.shape[0]) < self.batch_size
        return jnp.sum(jnp.where(counted, losses, 0.0)) / self.batch_size

    @property
    def num_pixels(self) -> int:
        """Input size of a flattened image."""
        return self.data["train"].images.shape[1] * self.data["train"].images.shape[2]


@task_dataclass
class LogisticRegression(ImageClassifier):
    """Multinomial logistic regression on flattened pixels."""

    family = "logistic"

    @classmethod
    def create(cls, dataset: str = "fashion_mnist8", batch_size: int = 128,
               pad_batch_to: int = 0) -> LogisticRegression:
        """Builds the task on ``dataset`` (a name in ``IMAGE_DATASETS``); ``pad_batch_to``: see
        the module docstring (0: no padding)."""
        return cls(data=device_images(dataset), **cls.batch_fields(batch_size, pad_batch_to))

    def init(self, key: jax.Array) -> list[dict[str, jax.Array]]:
        """One dense layer."""
        return init_mlp(key, (self.num_pixels, NUM_CLASSES))

    def logits(self, params, images: jax.Array) -> jax.Array:
        """Affine scores of the flattened pixels."""
        (layer,) = params
        return images.reshape(images.shape[0], -1) @ layer["w"] + layer["b"]


@task_dataclass
class MLPClassifier(ImageClassifier):
    """A multilayer perceptron on flattened pixels."""

    activation: jax.Array  # () int32: the index of the nonlinearity in ACTIVATIONS
    hidden: tuple[int, ...] = static_field()

    family = "mlp"

    @classmethod
    def create(cls, dataset: str = "fashion_mnist8", batch_size: int = 128,
               hidden: tuple[int, ...] = (32, 32), activation: str = "relu",
               pad_batch_to: int = 0) -> MLPClassifier:
        """Builds the task.

        Args:
          dataset: a name in ``IMAGE_DATASETS``.
          batch_size: examples per batch.
          hidden: widths of the hidden layers.
          activation: a name in :data:`ACTIVATIONS`.
          pad_batch_to: draw this many examples per batch, of which ``batch_size`` count (0:
            no padding); see the module docstring.

        Returns:
          The task.
        """
        return cls(data=device_images(dataset), **cls.batch_fields(batch_size, pad_batch_to),
                   hidden=check_widths("hidden", hidden), activation=activation_index(activation))

    def init(self, key: jax.Array) -> list[dict[str, jax.Array]]:
        """Dense layers pixels -> hidden... -> 10."""
        return init_mlp(key, (self.num_pixels, *self.hidden, NUM_CLASSES))

    def logits(self, params, images: jax.Array) -> jax.Array:
        """The MLP applied to the flattened pixels."""
        return apply_mlp(params, images.reshape(images.shape[0], -1),
                         functools.partial(activate, self.activation))


@task_dataclass
class ConvNetClassifier(ImageClassifier):
    """A small convnet: strided convolutions, then a linear layer.

    Each convolution is 3x3 with stride 2 and 'SAME' padding (so it halves the image side) and is
    followed by the activation; the linear layer reads the flattened last feature map.
    """

    activation: jax.Array  # () int32: the index of the nonlinearity in ACTIVATIONS
    channels: tuple[int, ...] = static_field()

    family = "convnet"

    @classmethod
    def create(cls, dataset: str = "fashion_mnist16", batch_size: int = 128,
               channels: tuple[int, ...] = (8, 16), activation: str = "relu",
               pad_batch_to: int = 0) -> ConvNetClassifier:
        """Builds the task.

        Args:
          dataset: a name in ``IMAGE_DATASETS``.
          batch_size: examples per batch.
          channels: output channels of each convolution; each one halves the image side.
          activation: a name in :data:`ACTIVATIONS`.
          pad_batch_to: as for :class:`MLPClassifier`.

        Returns:
          The task.
        """
        data = device_images(dataset)
        channels = check_widths("channels", channels)
        if not channels or 2 ** len(channels) > IMAGE_DATASETS[dataset]:
            raise ValueError(f"channels must have 1 to log2(side) entries, got {channels!r}")
        return cls(data=data, **cls.batch_fields(batch_size, pad_batch_to), channels=channels,
                   activation=activation_index(activation))

    def init(self, key: jax.Array) -> dict:
        """Kernels in HWIO layout, biases, and the output layer."""
        keys = jax.random.split(key, len(self.channels) + 1)
        side = self.data["train"].images.shape[1]
        convs, in_channels = [], 1
        for k, out_channels in zip(keys, self.channels):
            kernel = jax.nn.initializers.lecun_normal()(k, (3, 3, in_channels, out_channels))
            convs.append({"w": kernel, "b": jnp.zeros(out_channels)})
            in_channels, side = out_channels, -(-side // 2)
        return {"convs": convs, "out": init_mlp(keys[-1], (side * side * in_channels, NUM_CLASSES))}

    def logits(self, params, images: jax.Array) -> jax.Array:
        """Convolutions, then the linear layer."""
        x = images[..., None]  # NHWC with one channel
        for conv in params["convs"]:
            x = jax.lax.conv_general_dilated(x, conv["w"], window_strides=(2, 2), padding="SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = activate(self.activation, x + conv["b"])
        (out,) = params["out"]
        return x.reshape(x.shape[0], -1) @ out["w"] + out["b"]
