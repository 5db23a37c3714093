"""Small MLP autoencoders trained on pixel reconstruction (mean squared error).

The encoder maps the flattened image through ``hidden`` (the last width is the code), the
decoder mirrors it back to the pixels, and a sigmoid keeps the reconstruction in [0, 1]. This
family is held out of the default training distribution (see ``distribution.py``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from selfopt.tasks.base import Task, static_field, task_dataclass
from selfopt.tasks.classifiers import (ImageSplit, activate, activation_index, apply_mlp,
                                       check_positive_int, check_widths, device_images, init_mlp,
                                       sample_images)


@task_dataclass
class Autoencoder(Task):
    """An MLP autoencoder ``pixels -> hidden... -> reversed(hidden[:-1]) -> pixels``."""

    data: dict[str, ImageSplit]  # the data set's splits (the labels are unused)
    activation: jax.Array  # () int32: the index of the nonlinearity in ACTIVATIONS
    batch_size: int = static_field()
    hidden: tuple[int, ...] = static_field()

    family = "autoencoder"
    loss_floor = 0.0

    @classmethod
    def create(cls, dataset: str = "fashion_mnist8", batch_size: int = 128,
               hidden: tuple[int, ...] = (32, 8), activation: str = "relu") -> Autoencoder:
        """Builds the task.

        Args:
          dataset: a name in ``IMAGE_DATASETS``.
          batch_size: images per batch.
          hidden: encoder widths; the last one is the code size.
          activation: a name in ``classifiers.ACTIVATIONS``.

        Returns:
          The task.
        """
        hidden = check_widths("hidden", hidden)
        if not hidden:
            raise ValueError("hidden must have at least one width (the code size)")
        return cls(data=device_images(dataset), activation=activation_index(activation),
                   batch_size=check_positive_int("batch_size", batch_size), hidden=hidden)

    def init(self, key: jax.Array) -> list[dict[str, jax.Array]]:
        """Dense layers of the encoder and the mirrored decoder."""
        pixels = self.data["train"].images.shape[1] * self.data["train"].images.shape[2]
        return init_mlp(key, (pixels, *self.hidden, *reversed(self.hidden[:-1]), pixels))

    def sample_batch(self, key: jax.Array, split: str = "train") -> jax.Array:
        """Flattened float32 images in [0, 1], drawn with replacement."""
        images, _ = sample_images(self.data, key, split, self.batch_size)
        return images.reshape(self.batch_size, -1)

    def loss(self, params: list[dict[str, jax.Array]], batch: jax.Array) -> jax.Array:
        """Mean squared reconstruction error per pixel."""
        reconstruction = jax.nn.sigmoid(
            apply_mlp(params, batch, functools.partial(activate, self.activation)))
        return jnp.mean((reconstruction - batch) ** 2)
