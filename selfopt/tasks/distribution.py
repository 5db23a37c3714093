"""Task configurations, the training distribution over them, and the held-out evaluation set.

A task configuration is a JSON-able dict ``{"family": name, "seed": int, **family fields}``;
:func:`make_task` turns it into a :class:`~selfopt.tasks.base.Task`. The ``seed`` draws the
instance itself where the family has instance randomness (a quadratic's matrix and target), and
by convention it is also the seed of the PRNG key from which an evaluation draws the initial
parameters and the batches (``jax.random.key(config["seed"])``), so a configuration names one
reproducible training run.

:class:`TaskDistribution` samples configurations from finite grids (:data:`TRAIN_GRIDS`): every
distinct combination of static fields is one more JIT compilation, so the grids keep that number
bounded (36 shapes for all training families; 6 with :data:`COMPACT_GRIDS`, the default of
``selfopt train``). Only what changes array shapes or structure is static: data sets of one image
side, activations, test functions, noise levels and conditioning are leaves, so they vary
without compilations. Training seeds are below
:data:`HELDOUT_SEED_START`. The held-out set (:data:`HELDOUT_CONFIGS`, method.md section 6) is
disjoint from anything :meth:`TaskDistribution.sample` can return three ways: every held-out seed
is at least :data:`HELDOUT_SEED_START`; most held-out configurations also use a size, activation
or function outside the training grids; and the ``autoencoder`` family is never sampled.
"""
from __future__ import annotations

import dataclasses
import inspect
import numbers
from typing import Any, Callable, Mapping

import jax
import numpy as np

from selfopt.tasks.augmentation import Reparametrized, check_reparam_scale
from selfopt.tasks.autoencoder import Autoencoder
from selfopt.tasks.base import Task
from selfopt.tasks.classifiers import ConvNetClassifier, LogisticRegression, MLPClassifier
from selfopt.tasks.language_model import LanguageModel
from selfopt.tasks.lopt_training import LOptTraining
from selfopt.tasks.quadratic import Quadratic
from selfopt.tasks.regression import TeacherRegression
from selfopt.tasks.test_functions import TestFunction

#: family name -> constructor taking the configuration's fields as keyword arguments.
FAMILIES: dict[str, Callable[..., Task]] = {
    cls.family: cls.create
    for cls in (Quadratic, TestFunction, LogisticRegression, MLPClassifier, ConvNetClassifier,
                LanguageModel, LOptTraining, Autoencoder, TeacherRegression)
}

#: Families that the training distribution may sample.
TRAIN_FAMILIES = ("quadratic", "test_function", "logistic", "mlp", "convnet", "language_model",
                  "lopt_training", "regression")
#: The default training families: the fast ones.
DEFAULT_FAMILIES = ("quadratic", "test_function", "logistic", "mlp")
#: Families reserved for evaluation: no training distribution samples them.
HELDOUT_FAMILIES = ("autoencoder",)
#: Training seeds are drawn from ``[0, HELDOUT_SEED_START)``; held-out seeds are at least this.
HELDOUT_SEED_START = 1_000_000

#: family -> field -> the values the training distribution draws from (uniformly, independently).
#: Fields not listed keep the constructor's default.
TRAIN_GRIDS: dict[str, dict[str, tuple]] = {
    "quadratic": {"dim": (4, 16, 64), "log_condition": (0.0, 1.0, 2.0, 3.0),
                  "noise": (0.0, 0.01, 0.1)},
    "test_function": {"function": ("rosenbrock", "beale", "booth", "matyas", "three_hump_camel"),
                      "init_scale": (0.1, 0.5), "noise": (0.0, 0.1)},
    "logistic": {"dataset": ("fashion_mnist8", "fashion_mnist16", "digits8"),
                 "batch_size": (32, 128)},
    "mlp": {"dataset": ("fashion_mnist8", "digits8"), "batch_size": (32, 128),
            "hidden": ((32,), (64,), (32, 32)), "activation": ("relu", "tanh")},
    "convnet": {"dataset": ("fashion_mnist16", "fashion_mnist8"), "batch_size": (32, 128),
                "channels": ((8, 16), (16, 32))},
    "language_model": {"cell": ("lstm", "gru", "rnn"), "hidden": (32, 64),
                       "batch_size": (16, 32)},
    # one shape: the inner gradient noise is a leaf
    "lopt_training": {"noise": (0.0, 0.1, 1.0)},
    # one shape: two hidden layers under a squared loss; data set, activation, noise are leaves
    "regression": {"dataset": ("fashion_mnist8", "digits8"), "batch_size": (128,),
                   "hidden": ((32, 16),), "activation": ("relu", "tanh"), "noise": (0.0, 0.1)},
}

#: The compact grids: the families' variety in conditioning, noise, functions, data sets and
#: activations, but few *shapes* (6 for the default families, against 14): each new shape
#: costs seconds of compiling on a CPU, which on the full grid ate most of a short run
#: (docs/results.md). Families not listed use their full grid.
COMPACT_GRIDS: dict[str, dict[str, tuple]] = {
    **TRAIN_GRIDS,
    "quadratic": {**TRAIN_GRIDS["quadratic"], "dim": (16, 64)},
    "logistic": {"dataset": ("fashion_mnist8", "digits8"), "batch_size": (128,)},
    "mlp": {"dataset": ("fashion_mnist8", "digits8"), "batch_size": (128,),
            "hidden": ((32,), (32, 32)), "activation": ("relu", "tanh")},
}
#: Grids by name (the ``task_grid`` of a run's configuration).
GRIDS = {"compact": COMPACT_GRIDS, "full": TRAIN_GRIDS}

#: The fixed evaluation set. Apart from the seeds, the comment says what else is new.
HELDOUT_CONFIGS: tuple[dict[str, Any], ...] = (
    {"family": "quadratic", "seed": 1_000_000, "dim": 32},  # unseen dim
    {"family": "quadratic", "seed": 1_000_001, "dim": 128, "log_condition": 4.0,
     "noise": 0.0},  # larger and worse conditioned than any training quadratic
    {"family": "test_function", "seed": 1_000_002, "function": "himmelblau"},  # unseen function
    {"family": "test_function", "seed": 1_000_003, "function": "rosenbrock"},  # seed only
    {"family": "logistic", "seed": 1_000_004, "dataset": "digits8", "batch_size": 64},
    {"family": "mlp", "seed": 1_000_005, "hidden": [128, 64], "batch_size": 64},
    {"family": "mlp", "seed": 1_000_006, "dataset": "digits8", "hidden": [48],
     "activation": "silu", "batch_size": 32},  # unseen width and activation
    {"family": "convnet", "seed": 1_000_007, "channels": [12, 24], "batch_size": 64},
    {"family": "language_model", "seed": 1_000_008, "cell": "lstm", "hidden": 96},
    {"family": "language_model", "seed": 1_000_009, "cell": "gru", "hidden": 48,
     "batch_size": 16},
    {"family": "autoencoder", "seed": 1_000_010},  # unseen family
    {"family": "autoencoder", "seed": 1_000_011, "dataset": "digits8", "hidden": [32, 16],
     "activation": "tanh", "batch_size": 64},
)

#: Seeds of the test suite: at least this, above every held-out seed.
TEST_SEED_START = 2_000_000
#: Inner steps of the test suite's tasks that are new (the others keep the suite's budget).
TEST_HORIZON = 1000

#: The test suite (issue 32): nothing is chosen with it; it reports the default once fixed.
#: Every held-out task again with a new seed, then tasks unlike any training family and any
#: held-out task, each trained for :data:`TEST_HORIZON` steps (its ``steps``, read by
#: :func:`selfopt.evaluate.evaluate`); the comment says what is new.
TEST_CONFIGS: tuple[dict[str, Any], ...] = (
    *({**config, "seed": TEST_SEED_START + i} for i, config in enumerate(HELDOUT_CONFIGS)),
    {"family": "mlp", "seed": TEST_SEED_START + 100, "dataset": "fashion_mnist16",
     "hidden": [64, 64, 64], "activation": "gelu", "batch_size": 64,
     "steps": TEST_HORIZON},  # three hidden layers, 256 inputs, gelu
    {"family": "autoencoder", "seed": TEST_SEED_START + 101, "hidden": [48, 24, 6],
     "activation": "elu", "batch_size": 16, "steps": TEST_HORIZON},  # deeper, small batches
    {"family": "regression", "seed": TEST_SEED_START + 102, "dataset": "digits8",
     "hidden": [96], "activation": "silu", "outputs": 4, "noise": 0.05, "batch_size": 32,
     "steps": TEST_HORIZON},  # squared loss on a random teacher: a family never trained on
    {"family": "quadratic", "seed": TEST_SEED_START + 103, "dim": 256, "log_condition": 2.5,
     "noise": 0.05, "steps": TEST_HORIZON},  # four times the largest training dimension
    {"family": "logistic", "seed": TEST_SEED_START + 104, "dataset": "fashion_mnist16",
     "batch_size": 8, "steps": TEST_HORIZON},  # batches of 8
)


def full_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Checks a configuration's names and fills in every default.

    Besides the family's fields, any configuration may hold ``reparam_scale`` (a number >= 1):
    the task augmentation of :class:`~selfopt.tasks.augmentation.Reparametrized`, kept only
    where given. Field *values* are checked when the task is built (:func:`make_task`). Tuples
    become lists, so a configuration equals its JSON round trip; lists are copied, so the
    result shares nothing mutable with ``config``.

    Args:
      config: ``{"family": name, "seed": int (default 0), **family fields}``.

    Returns:
      A new dict with ``family``, ``seed`` and every field of the family's constructor.

    Raises:
      ValueError: the family, the seed or a field name is invalid.
    """
    config = dict(config)
    family = config.pop("family", None)
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; valid families: {sorted(FAMILIES)}")
    seed = config.pop("seed", 0)
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    augmentation = ({"reparam_scale": check_reparam_scale(config.pop("reparam_scale"))}
                    if "reparam_scale" in config else {})
    parameters = inspect.signature(FAMILIES[family]).parameters
    fields = {name: p.default for name, p in parameters.items() if name != "seed"}
    if unknown := sorted(set(config) - set(fields)):
        raise ValueError(f"unknown field(s) {unknown} for task family {family!r}; "
                         f"valid fields: {sorted(fields)} (and reparam_scale, for any family)")
    fields.update(config)
    return {"family": family, "seed": int(seed),
            **{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in fields.items()},
            **augmentation}


def make_task(config: Mapping[str, Any]) -> Task:
    """Builds the task a configuration describes.

    Args:
      config: ``{"family": name, "seed": int, **family fields}``; see :func:`full_config`.

    Returns:
      The task. Its ``seed`` is used where the family draws instance randomness, and draws
      the scales of a ``reparam_scale`` above 1 (then the task is
      :class:`~selfopt.tasks.augmentation.Reparametrized`).

    Raises:
      ValueError: an unknown family or field, or an invalid value (the message names it).
    """
    fields = full_config(config)
    create = FAMILIES[fields.pop("family")]
    seed = fields.pop("seed")
    reparam_scale = fields.pop("reparam_scale", 1.0)
    if "seed" in inspect.signature(create).parameters:
        fields["seed"] = seed
    task = create(**fields)
    return Reparametrized.create(task, reparam_scale, seed) if reparam_scale > 1 else task


def _numpy_rng(key_or_seed: int | jax.Array) -> np.random.Generator:
    """A NumPy generator seeded by an int or by the bits of a JAX PRNG key."""
    if isinstance(key_or_seed, numbers.Integral):
        return np.random.default_rng(int(key_or_seed))
    return np.random.default_rng(np.asarray(jax.random.key_data(key_or_seed)).ravel().tolist())


@dataclasses.dataclass(frozen=True)
class TaskDistribution:
    """The training distribution: a family uniformly from ``families``, then each field of the
    family's grid (:data:`GRIDS` ``[grid]``) uniformly, and a seed below
    :data:`HELDOUT_SEED_START`; with ``reparam_scale`` above 1, every task reparametrised
    (:class:`~selfopt.tasks.augmentation.Reparametrized`)."""

    #: Families to sample, a subset of :data:`TRAIN_FAMILIES` (default: the fast ones, so a
    #: laptop run shows the phenomenon).
    families: tuple[str, ...] = DEFAULT_FAMILIES
    #: ``compact`` (:data:`COMPACT_GRIDS`: few shapes) or ``full`` (:data:`TRAIN_GRIDS`).
    grid: str = "compact"
    #: Task augmentation: each tensor's scale log-uniform in ``[1/reparam_scale,
    #: reparam_scale]`` (1: none), so that no single step size suits every task.
    reparam_scale: float = 10.0

    def __post_init__(self):
        if isinstance(self.families, list):  # a JSON list is fine
            object.__setattr__(self, "families", tuple(self.families))
        object.__setattr__(self, "reparam_scale", check_reparam_scale(self.reparam_scale))
        if not isinstance(self.grid, str) or self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {sorted(GRIDS)}, got {self.grid!r}")
        if not isinstance(self.families, tuple) or not self.families:
            raise ValueError(f"families must be a non-empty list of training families from "
                             f"{list(TRAIN_FAMILIES)}, got {self.families!r}")
        for family in self.families:
            if isinstance(family, str) and family in HELDOUT_FAMILIES:
                raise ValueError(f"families: {family!r} is held out for evaluation; "
                                 f"training families: {list(TRAIN_FAMILIES)}")
            if not isinstance(family, str) or family not in TRAIN_FAMILIES:
                raise ValueError(f"families: unknown task family {family!r}; "
                                 f"training families: {list(TRAIN_FAMILIES)}")

    def sample(self, key_or_seed: int | jax.Array) -> dict[str, Any]:
        """Draws one configuration.

        Args:
          key_or_seed: an int seed or a JAX PRNG key; equal arguments give equal draws.

        Returns:
          A full configuration (see :func:`full_config`) for :func:`make_task`.
        """
        rng = _numpy_rng(key_or_seed)
        return self.sample_family(self.families[rng.integers(len(self.families))], rng)

    def sample_family(self, family: str, rng: np.random.Generator) -> dict[str, Any]:
        """Draws one configuration of ``family`` (each grid field uniformly, a training seed)."""
        fields = {name: values[rng.integers(len(values))]
                  for name, values in GRIDS[self.grid][family].items()}
        if self.reparam_scale > 1:
            fields["reparam_scale"] = self.reparam_scale
        return full_config({"family": family, "seed": int(rng.integers(HELDOUT_SEED_START)),
                            **fields})

    def heldout(self) -> list[dict[str, Any]]:
        """The fixed evaluation configurations (:data:`HELDOUT_CONFIGS`), as full configs.

        The list is the same for every distribution, restricted or not."""
        return [full_config(config) for config in HELDOUT_CONFIGS]
