"""Random ill-conditioned quadratics with noisy gradients.

``f(w) = 0.5 (w - w*)^T A (w - w*)`` with ``A = Q diag(eigenvalues) Q^T``: ``Q`` a uniformly
random rotation, the eigenvalues log-spaced from 1 down to ``10**-log_condition`` (so the
condition number is ``10**log_condition``), and ``w*`` a standard normal target. ``A`` and ``w*``
are drawn by NumPy from the configuration's seed and stored as pytree leaves, so every quadratic
of one dimension shares compiled code whatever its seed, conditioning or noise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from selfopt.tasks.base import SPLITS, Task, static_field, task_dataclass


@task_dataclass
class Quadratic(Task):
    """A random quadratic whose training batches perturb the target.

    A training batch is a noise vector ``b ~ N(0, noise^2 I)`` that moves the target to
    ``w* + b``. The loss subtracts the noise's own energy, ``0.5 b^T A b``:

        loss(w, b) = 0.5 (d - b)^T A (d - b) - 0.5 b^T A b = f(w) - b^T A d,   d = w - w*,

    so the gradient is that of the noisy-target quadratic, the *expected* loss is exactly the
    noise-free ``f(w)`` and its minimum is 0 (:attr:`loss_floor`). A single training batch's
    loss can dip below 0 near the optimum. Test batches carry no noise: the test loss is
    ``f(w)`` itself.
    """

    dim: int = static_field()
    matrix: jax.Array  # (dim, dim) float32, symmetric positive definite
    target: jax.Array  # (dim,) float32, the minimiser w*
    noise: jax.Array  # () float32, standard deviation of the target noise

    family = "quadratic"
    loss_floor = 0.0

    @classmethod
    def create(cls, seed: int = 0, dim: int = 16, log_condition: float = 2.0,
               noise: float = 0.1) -> Quadratic:
        """Draws the matrix and target from ``seed``.

        Args:
          seed: NumPy seed of the rotation ``Q`` and the target ``w*``.
          dim: number of parameters.
          log_condition: base-10 logarithm of the condition number of ``A``.
          noise: standard deviation of the per-batch target noise (0: deterministic).

        Returns:
          The task.
        """
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not 0.0 <= log_condition <= 8.0:
            raise ValueError(f"log_condition must be in [0, 8], got {log_condition!r}")
        if not noise >= 0.0:
            raise ValueError(f"noise must be >= 0, got {noise!r}")
        rng = np.random.default_rng(seed)
        q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
        rotation = q * np.sign(np.diag(r))  # sign fix: Haar-uniform rotation
        eigenvalues = np.logspace(0.0, -log_condition, dim)
        matrix = (rotation * eigenvalues) @ rotation.T
        return cls(dim=dim,
                   matrix=jnp.asarray(0.5 * (matrix + matrix.T), jnp.float32),
                   target=jnp.asarray(rng.standard_normal(dim), jnp.float32),
                   noise=jnp.asarray(noise, jnp.float32))

    def init(self, key: jax.Array) -> jax.Array:
        """A standard normal starting point."""
        return jax.random.normal(key, (self.dim,))

    def sample_batch(self, key: jax.Array, split: str = "train") -> jax.Array:
        """The target offset ``b``: Gaussian noise for training, zeros for testing."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "test":
            return jnp.zeros((self.dim,))
        return self.noise * jax.random.normal(key, (self.dim,))

    def loss(self, params: jax.Array, batch: jax.Array) -> jax.Array:
        """``0.5 d^T A d - b^T A d`` with ``d = w - w*`` (see the class docstring)."""
        displacement = params - self.target
        curvature = self.matrix @ displacement
        return 0.5 * displacement @ curvature - batch @ curvature
