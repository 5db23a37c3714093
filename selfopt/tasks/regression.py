"""Teacher-student regression: an MLP fits a fixed random network's outputs on real images.

The inputs are the flattened images of a data set; the targets are the outputs of a *teacher*,
a one-hidden-layer tanh network drawn by NumPy from the configuration's seed and stored as
leaves (so every teacher of one shape shares compiled code, as do the data sets of one image
side and the student's activations: see ``classifiers.py``). The student, an MLP, is trained
with mean squared error; training targets may carry Gaussian noise, test targets never do.

Why this family (**ours**, not in method.md): the training distribution's networks are
otherwise all classifiers (cross-entropy); this one gives the learned optimizers practice on a
deeper network under a squared loss, as a held-out autoencoder is, without training on the
held-out family itself (an autoencoder reconstructs its input; here the target is a random
function of it).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from selfopt.tasks.base import Task, static_field, task_dataclass
from selfopt.tasks.classifiers import (ImageSplit, activate, activation_index, apply_mlp,
                                       check_positive_int, check_widths, device_images, init_mlp,
                                       sample_images)
from selfopt.tasks.datasets import IMAGE_DATASETS

#: Width of the teacher's hidden layer.
TEACHER_HIDDEN = 32
#: The teacher's first-layer weights are N(0, (gain / sqrt(pixels))^2): with LeCun's gain of 1
#: pixels in [0, 1] would keep its tanh nearly linear.
TEACHER_GAIN = 3.0


@task_dataclass
class TeacherRegression(Task):
    """An MLP ``pixels -> hidden... -> outputs`` regressing a random teacher's outputs."""

    data: dict[str, ImageSplit]  # the data set's splits (the labels are unused)
    teacher: list  # the teacher's dense layers (pixels -> 32 -> outputs), float32
    noise: jax.Array  # () float32: standard deviation of the training targets' noise
    activation: jax.Array  # () int32: the student's nonlinearity, its index in ACTIVATIONS
    batch_size: int = static_field()
    hidden: tuple[int, ...] = static_field()

    family = "regression"
    loss_floor = 0.0

    @classmethod
    def create(cls, seed: int = 0, dataset: str = "fashion_mnist8", batch_size: int = 128,
               hidden: tuple[int, ...] = (32, 16), activation: str = "relu", outputs: int = 8,
               noise: float = 0.0) -> TeacherRegression:
        """Draws the teacher from ``seed`` and builds the task.

        Args:
          seed: NumPy seed of the teacher's weights.
          dataset: a name in ``IMAGE_DATASETS`` (the inputs).
          batch_size: examples per batch.
          hidden: the student's hidden widths.
          activation: the student's nonlinearity, a name in ``classifiers.ACTIVATIONS``.
          outputs: the number of regression targets (the teacher's outputs).
          noise: standard deviation of Gaussian noise on the training targets (>= 0).

        Returns:
          The task.
        """
        if dataset not in IMAGE_DATASETS:
            raise ValueError(f"dataset must be one of {sorted(IMAGE_DATASETS)}, got {dataset!r}")
        if not noise >= 0.0:
            raise ValueError(f"noise must be >= 0, got {noise!r}")
        outputs = check_positive_int("outputs", outputs)
        pixels = IMAGE_DATASETS[dataset] ** 2
        rng = np.random.default_rng(seed)
        teacher = [{"w": jnp.asarray(gain * rng.standard_normal((n_in, n_out)) / np.sqrt(n_in),
                                     jnp.float32),
                    "b": jnp.asarray(0.1 * rng.standard_normal(n_out), jnp.float32)}
                   for gain, n_in, n_out in ((TEACHER_GAIN, pixels, TEACHER_HIDDEN),
                                             (1.0, TEACHER_HIDDEN, outputs))]
        return cls(data=device_images(dataset), teacher=teacher,
                   noise=jnp.asarray(noise, jnp.float32), activation=activation_index(activation),
                   batch_size=check_positive_int("batch_size", batch_size),
                   hidden=check_widths("hidden", hidden))

    def init(self, key: jax.Array) -> list[dict[str, jax.Array]]:
        """The student's dense layers, LeCun-normal as the classifiers'."""
        pixels, outputs = self.teacher[0]["w"].shape[0], self.teacher[-1]["w"].shape[1]
        return init_mlp(key, (pixels, *self.hidden, outputs))

    def sample_batch(self, key: jax.Array, split: str = "train") -> tuple[jax.Array, jax.Array]:
        """``(inputs, targets)``: flattened images in [0, 1] and the teacher's outputs (plus
        noise on the training split)."""
        image_key, noise_key = jax.random.split(key)
        images, _ = sample_images(self.data, image_key, split, self.batch_size)
        inputs = images.reshape(self.batch_size, -1)
        targets = apply_mlp(self.teacher, inputs, jnp.tanh)
        if split == "train":
            targets = targets + self.noise * jax.random.normal(noise_key, targets.shape)
        return inputs, targets

    def loss(self, params: list[dict[str, jax.Array]],
             batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        """Mean squared error per target."""
        inputs, targets = batch
        outputs = apply_mlp(params, inputs, functools.partial(activate, self.activation))
        return jnp.mean((outputs - targets) ** 2)
