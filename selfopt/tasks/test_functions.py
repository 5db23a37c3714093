"""Classical 2-D optimisation test functions (Rosenbrock and kin), all with minimum 0.

Formulas and standard domains as in Jamil & Yang, "A literature survey of benchmark functions for
global optimisation problems" (2013). Every function here has global minimum 0, which is the
task's :attr:`loss_floor`. The function is a leaf of the task (an index into
:data:`TEST_FUNCTIONS`), as are its starting point, ``init_scale`` and ``noise``, so every test
function task has one shape and shares compiled code.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from selfopt.tasks.base import SPLITS, Task, task_dataclass


def rosenbrock(x, y):
    """Rosenbrock's banana valley; minimum 0 at (1, 1)."""
    return (1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2


def beale(x, y):
    """Beale's function; minimum 0 at (3, 0.5)."""
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def booth(x, y):
    """Booth's function, a tilted quadratic bowl; minimum 0 at (1, 3)."""
    return (x + 2.0 * y - 7.0) ** 2 + (2.0 * x + y - 5.0) ** 2


def himmelblau(x, y):
    """Himmelblau's function; four global minima of 0, one at (3, 2)."""
    return (x**2 + y - 11.0) ** 2 + (x + y**2 - 7.0) ** 2


def matyas(x, y):
    """Matyas' function, a narrow diagonal valley (condition number 25); minimum 0 at (0, 0)."""
    return 0.26 * (x**2 + y**2) - 0.48 * x * y


def three_hump_camel(x, y):
    """The three-hump camel: two local minima beside the global minimum 0 at (0, 0)."""
    return 2.0 * x**2 - 1.05 * x**4 + x**6 / 6.0 + x * y + y**2


#: name -> (function of x and y, standard starting point).
TEST_FUNCTIONS: dict[str, tuple[Callable, tuple[float, float]]] = {
    "rosenbrock": (rosenbrock, (-1.2, 1.0)),
    "beale": (beale, (1.0, 1.0)),
    "booth": (booth, (0.0, 0.0)),
    "himmelblau": (himmelblau, (0.0, 0.0)),
    "matyas": (matyas, (5.0, 2.0)),
    "three_hump_camel": (three_hump_camel, (2.0, 2.0)),
}


@task_dataclass
class TestFunction(Task):
    """One of :data:`TEST_FUNCTIONS` as a task on a length-2 parameter vector.

    Initialisation is the function's standard start plus ``init_scale`` times standard normal
    noise. A training batch ``b ~ N(0, noise^2 I)`` adds the linear term ``b . w`` to the loss,
    i.e. zero-mean noise on the gradient that leaves the expected loss (and its minimum 0)
    unchanged; test batches are zeros.
    """

    function: jax.Array  # () int32: the index of the function in TEST_FUNCTIONS
    start: jax.Array  # (2,) float32: the function's standard start
    init_scale: jax.Array  # () float32
    noise: jax.Array  # () float32

    family = "test_function"
    loss_floor = 0.0
    __test__ = False  # not a pytest test class, despite its name

    @classmethod
    def create(cls, function: str = "rosenbrock", init_scale: float = 0.5,
               noise: float = 0.0) -> TestFunction:
        """Builds the task.

        Args:
          function: a name in :data:`TEST_FUNCTIONS`.
          init_scale: standard deviation of the initial point around the standard start.
          noise: standard deviation of the gradient noise (0: deterministic).

        Returns:
          The task.
        """
        if function not in TEST_FUNCTIONS:
            raise ValueError(f"function must be one of {sorted(TEST_FUNCTIONS)}, got {function!r}")
        if not init_scale >= 0.0:
            raise ValueError(f"init_scale must be >= 0, got {init_scale!r}")
        if not noise >= 0.0:
            raise ValueError(f"noise must be >= 0, got {noise!r}")
        return cls(function=jnp.asarray(list(TEST_FUNCTIONS).index(function), jnp.int32),
                   start=jnp.asarray(TEST_FUNCTIONS[function][1], jnp.float32),
                   init_scale=jnp.asarray(init_scale, jnp.float32),
                   noise=jnp.asarray(noise, jnp.float32))

    def init(self, key: jax.Array) -> jax.Array:
        """The standard start point, randomly perturbed."""
        return self.start + self.init_scale * jax.random.normal(key, (2,))

    def sample_batch(self, key: jax.Array, split: str = "train") -> jax.Array:
        """The gradient noise vector: Gaussian for training, zeros for testing."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "test":
            return jnp.zeros((2,))
        return self.noise * jax.random.normal(key, (2,))

    def loss(self, params: jax.Array, batch: jax.Array) -> jax.Array:
        """``f(x, y) + b . (x, y)``, ``f`` the :attr:`function`-th of :data:`TEST_FUNCTIONS`."""
        functions = tuple(f for f, _ in TEST_FUNCTIONS.values())
        return jax.lax.switch(self.function, functions, params[0], params[1]) + batch @ params
