"""Configuration of a self-training run: one frozen dataclass, validated once at the edge.

A configuration is built from defaults, then a JSON file (``--config``), then command-line
flags, and checked by :func:`validate`: a bad value raises :class:`ConfigError` with one line
naming the field and what it allows. The run directory stores the final configuration as
``config.json``, so a run can always be told apart and resumed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any

from selfopt.estimators.inner_problem import LOSS_AVERAGES, NORMALIZATIONS
from selfopt.lopt.mlp_lopt import STEP_SCHEDULES
from selfopt.population.self_training import POLICIES, TRUST_REGIONS
from selfopt.tasks.base import SPLITS
from selfopt.tasks.distribution import GRIDS, HELDOUT_FAMILIES, TRAIN_FAMILIES

ESTIMATORS = ("es", "pes")
OUTER_OPTIMIZERS = ("self", "adam")
PBT_SCORES = ("task", "held_in")
VALIDATE_PROBLEMS = ("defaults", "grid", "full")
#: The default training families: the fast ones, so a laptop run shows the phenomenon.
DEFAULT_FAMILIES = ("quadratic", "test_function", "logistic", "mlp")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a self-training run (defaults: the laptop run)."""

    # population and budget
    population: int = 8
    minutes: float = 10.0
    max_steps: int = 0  # outer steps; 0 = until the time budget is spent
    seed: int = 0
    # who trains the members: "self" (learned optimizers of the population) or "adam" (control)
    outer_optimizer: str = "self"
    policy: str = "self"
    # elementwise clip of each member's ES estimate, in units of its RMS with clip_relative
    # (ours; the paper's is absolute, 0.1, which makes ES sign-ES once estimates grow)
    clip: float = 3.0
    clip_relative: bool = True
    max_update: float = 0.003  # bound on the RMS of a member's step (ours: a trust region)
    # "step": max_update bounds the step; "proposal": it bounds the optimizer's proposal before
    # the PBT-tuned step multiplier scales it (so the multiplier sets the step length)
    trust_region: str = "step"
    # a member at or above this meta-loss (ratio scale: with log normalization, the geometric
    # mean of the loss ratios) is replaced at once
    diverged_meta_loss: float = 5.0
    adam_learning_rate: float = 1e-3
    # the learned-optimizer architecture
    hidden: tuple[int, ...] = (32, 32)
    # also feed the Adam-like momenta m/sqrt(v) without per-tensor normalisation (MLPLOpt)
    raw_adam_features: bool = True
    # also feed log-magnitudes of the gradient, parameter and RMS (MLPLOpt; off: scale-free)
    magnitude_features: bool = True
    # also feed the fraction of training done, so the LO can learn a schedule (MLPLOpt)
    horizon_features: bool = False
    # also feed each tensor's log fan-in and fan-out (MLPLOpt): a bias, a wide or a narrow layer
    tensor_features: bool = False
    # feed the momenta and the squared-gradient RMS bias-corrected, as Adam does (MLPLOpt)
    bias_correction: bool = False
    # the LO reads the trend of the loss it is given (MLPLOpt.loss_features): the inner loss,
    # and the meta-loss in its self-update
    loss_features: bool = False
    # the LO reads the model's depth, 1 / (1 + number of weight matrices) (MLPLOpt.depth_features):
    # tuned Adam's rate falls with depth, and a logistic regression's weights look like an
    # MLP's last layer to the per-parameter features
    depth_features: bool = False
    # decay of the LO's squared-gradient accumulator (MLPLOpt.rms_decay)
    rms_decay: float = 0.999
    # epsilon of the LO's Adam-like ratios and per-tensor normalisation (MLPLOpt.eps): 1e-8
    # attenuates them where the gradient is smaller than about 1e-4 (the autoencoders)
    feature_eps: float = 1e-8
    # 0 (off) or a width b: the LO's step on a tensor of fan-in above b is scaled by
    # b / fan_in, as muP scales Adam's rate with width (MLPLOpt.width_base; 32, the training
    # MLPs' width: runs 54-57 of docs/results.md against 45/48-51, four seeds each)
    width_base: int = 32
    # 0 (off) or a power a: the LO's step on a model with K >= 1 weight matrices is scaled by
    # K ** -a, as tuned Adam's rate falls with depth (MLPLOpt.depth_power; 1.5 with the compact
    # grid's two-layer MLPs: runs 118-121 of docs/results.md against 101-104 (1) and 113-116
    # (2), four seeds each)
    depth_power: float = 1.5
    # each tensor's step times the RMS of its Adam-like ratio m / sqrt(v) at decay 0.9
    # (MLPLOpt.ratio_step_scale): the step shrinks near a minimum, as Adam's does (off: runs
    # 122-125 of docs/results.md came closer on the precision tasks and lost the learning ones)
    ratio_step_scale: bool = False
    # with ratio_step_scale: 0 (the factor is r) or a knee k, the factor min(1, r / k): only a
    # step whose r fell below k shrinks (MLPLOpt.ratio_step_knee)
    ratio_step_knee: float = 0.0
    # 0 (off) or a rate: each tensor's step scale, exp(s), with s moved by rate * tanh(the mean
    # of a third LO output over the tensor) every step, so the LO can raise or lower a task's
    # step over the run as a per-task rate search would (MLPLOpt.step_adaptation); members
    # update each other without it (off: 0.05 and 0.01 stalled, the scales ran to their bound,
    # docs/results.md)
    step_adaptation: float = 0.0
    # "constant" or "linear": the LO's step decays linearly to 0 over each inner run (a fixed
    # rule, MLPLOpt.step_schedule; members update each other without it)
    step_schedule: str = "constant"
    # with horizon_features: the outer steps self-training's LOs are told their own training
    # takes (nominal: self-training is open-ended)
    outer_horizon: int = 10_000
    # c_m of the step -d * exp(c_m * m) * c_s: how strongly the magnitude output m scales a step
    exp_mult: float = 0.001
    # meta-gradient estimator
    estimator: str = "es"
    num_pairs: int = 4
    truncation_length: int = 20
    min_inner_length: int = 100
    max_inner_length: int = 1000
    normalization: str = "log"
    loss_cap: float = 10.0
    # with log normalisation: the smallest normalised loss the meta-loss counts
    log_floor: float = 1e-6
    # a truncation's meta-loss: "mean" over its steps, or "final" (its last 10%)
    meta_loss: str = "mean"
    # the data a truncation's meta-loss is measured on: "train" (the training minibatches) or
    # "test" (the same parameters on the task's test split)
    meta_split: str = "train"
    # tasks: slots of inner problems in flight, each on one task for task_steps outer steps
    families: tuple[str, ...] = DEFAULT_FAMILIES
    # "compact": few task shapes, so compilation does not eat a laptop run; "full": the full grids
    task_grid: str = "compact"
    # task augmentation: every training task reparametrised, each tensor's scale log-uniform in
    # [1/reparam_scale, reparam_scale], so no single step size suits them all (1: off; 10:
    # runs 45 of docs/results.md against 37, four seeds each)
    reparam_scale: float = 10.0
    num_slots: int = 2
    task_steps: int = 40
    # each slot samples one family (slot s: families[s % len(families)]) instead of any, so a
    # run never spends a long stretch on one kind of task (and forgets the others)
    stratify_slots: bool = False
    # population-based training: a round every pbt_interval outer steps (50: runs 37/37'/37''
    # of docs/results.md beat 10 over three seeds)
    pbt_interval: int = 50
    # outer steps per compiled call (one task, no host round trip in between; for GPUs);
    # failed members are replaced, and PBT runs, between calls
    steps_per_call: int = 1
    exploit_fraction: float = 0.25
    resample_probability: float = 0.1
    step_mult_prior: tuple[float, float] = (0.3, 30.0)
    sigma_prior: tuple[float, float] = (0.003, 0.03)
    explore_sigma: bool = True
    score_steps: int = 50
    # what PBT scores and validation average: "mean" (normalised loss over every step) or
    # "final" (over the last 10% of the steps, as evaluation's final loss)
    score_loss: str = "final"
    # what PBT ranks members by: "task", the step's task (fresh problems); "held_in", every
    # training family's default task (mean; comparable from round to round)
    pbt_score: str = "task"
    summary_steps: int = 100  # inner steps of the summary's held-in start/end comparison
    # held-in validation: every validate_interval outer steps (0: never), every member trains
    # the fixed held-in problems (each training family's default task, training seeds); the
    # best weights seen so far are the run's *elite*, which evaluation and export use
    validate_interval: int = 50
    validate_steps: int = 300  # inner steps of each validation problem (as evaluation)
    # "defaults": each training family's default task, two problems; "grid": two configurations
    # of each family from the task grid, one problem each (same cost, more variety); "full":
    # the same from the full grids (with the compact grid: sizes the population trains without)
    validate_problems: str = "defaults"
    # false: the same problems at every validation (scores comparable across rounds); true:
    # new problems each validation (a new training seed and draw), the elite re-scored beside
    # the members on them, so it is replaced only by a member that beats it on the same
    # problems, not by one that fits the fixed problems' noise best (off: worse answers in
    # docs/results.md; the elite changed by chance more often)
    validate_fresh: bool = False
    # when no member validates as well as the elite, the elite replaces the worst member
    restore_elite: bool = True
    # evaluation during training: the best member against tuned Adam on the "quick" held-out
    # suite every eval_minutes of training (0: never); logged to eval.jsonl
    eval_minutes: float = 2.0
    eval_steps: int = 300
    eval_seeds: int = 3
    # run directory
    checkpoint_seconds: float = 60.0  # 0: after every outer step
    keep_checkpoints: int = 2

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
#: Fields added after runs were already stored, with the value a stored configuration that lacks
#: one had in effect (where that differs from today's default): an old run resumes unchanged.
STORED_DEFAULTS: dict[str, Any] = {"raw_adam_features": False, "reparam_scale": 1.0,
                                   "width_base": 0, "clip_relative": False,
                                   "depth_power": 0.0}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        return False


def _short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (an error stays one readable line)."""
    try:
        text = repr(value)
    except ValueError:  # an integer with more digits than Python will print
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _one_line(value: Any, limit: int = 160) -> str:
    """``str(value)`` on one line of at most ``limit`` characters."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check(name: str, ok: bool, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config field {name!r} must be {allowed}, got {_short_repr(value)}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Checks every field; returns ``cfg`` or raises :class:`ConfigError`."""
    c = cfg
    # Upper bounds: far above any run a machine can hold, low enough that a typo (an extra
    # three zeros) is an error rather than an allocation that never finishes.
    for name, lo, hi in (("population", 2, 4096), ("num_pairs", 1, 4096),
                         ("truncation_length", 1, 1_000_000), ("min_inner_length", 1, 10**7),
                         ("num_slots", 1, 1024), ("steps_per_call", 1, 1000),
                         ("task_steps", 1, 1_000_000),
                         ("pbt_interval", 1, 1_000_000), ("score_steps", 1, 1_000_000),
                         ("summary_steps", 1, 1_000_000), ("keep_checkpoints", 1, 1000),
                         ("validate_interval", 0, 1_000_000), ("validate_steps", 1, 1_000_000),
                         ("eval_steps", 10, 1_000_000), ("eval_seeds", 1, 1000),
                         ("outer_horizon", 1, 10**9), ("width_base", 0, 1_000_000)):
        value = getattr(c, name)
        _check(name, _is_int(value) and lo <= value <= hi, f"an integer in [{lo}, {hi}]",
               value)
    _check("max_steps", _is_int(c.max_steps) and 0 <= c.max_steps <= 10**9,
           "an integer >= 0 (0: no limit)", c.max_steps)
    _check("seed", _is_int(c.seed) and 0 <= c.seed < 2**31, "an integer in [0, 2^31)", c.seed)
    _check("max_inner_length", _is_int(c.max_inner_length)
           and _is_int(c.min_inner_length) and c.min_inner_length <= c.max_inner_length <= 10**7,
           "an integer >= min_inner_length", c.max_inner_length)
    _check("minutes", _is_number(c.minutes) and 0 < c.minutes <= 60 * 24 * 30,
           "a number of minutes in (0, 43200]", c.minutes)
    _check("eval_minutes", _is_number(c.eval_minutes) and 0 <= c.eval_minutes <= 60 * 24 * 30,
           "a number of minutes in [0, 43200] (0: no evaluation during training)",
           c.eval_minutes)
    for name, lo, hi in (("clip", 0, 1e6), ("max_update", 0, 1e6), ("diverged_meta_loss", 0, 1e6),
                         ("adam_learning_rate", 0, 10), ("loss_cap", 1, 1e6), ("exp_mult", 0, 10),
                         ("log_floor", 1e-30, 0.1), ("feature_eps", 1e-30, 1)):
        value = getattr(c, name)
        _check(name, _is_number(value) and lo < value <= hi, f"a number in ({lo:g}, {hi:g}]",
               value)
    _check("checkpoint_seconds", _is_number(c.checkpoint_seconds)
           and 0 <= c.checkpoint_seconds <= 1e6, "a number in [0, 1e+06] (0: every step)",
           c.checkpoint_seconds)
    for name, lo, hi in (("exploit_fraction", 0, 0.5), ("resample_probability", 0, 1)):
        value = getattr(c, name)
        _check(name, _is_number(value) and lo <= value <= hi, f"a number in [{lo}, {hi}]", value)
    for name, choices in (("outer_optimizer", OUTER_OPTIMIZERS), ("policy", POLICIES),
                          ("pbt_score", PBT_SCORES), ("trust_region", TRUST_REGIONS),
                          ("score_loss", LOSS_AVERAGES), ("task_grid", tuple(GRIDS)),
                          ("validate_problems", VALIDATE_PROBLEMS),
                          ("estimator", ESTIMATORS), ("normalization", NORMALIZATIONS),
                          ("meta_loss", LOSS_AVERAGES), ("meta_split", SPLITS),
                          ("step_schedule", STEP_SCHEDULES)):
        value = getattr(c, name)
        _check(name, value in choices, f"one of {list(choices)}", value)
    for name in ("clip_relative", "explore_sigma", "stratify_slots", "restore_elite",
                 "raw_adam_features", "magnitude_features", "horizon_features", "tensor_features",
                 "bias_correction", "loss_features", "depth_features", "ratio_step_scale",
                 "validate_fresh"):
        _check(name, isinstance(getattr(c, name), bool), "true or false", getattr(c, name))
    _check("hidden", isinstance(c.hidden, tuple) and 1 <= len(c.hidden) <= 4
           and all(_is_int(w) and 1 <= w <= 1024 for w in c.hidden),
           "1 to 4 layer widths, each in [1, 1024]", c.hidden)
    _check("reparam_scale", _is_number(c.reparam_scale) and 1 <= c.reparam_scale <= 1e3,
           "a number in [1, 1000] (1: off)", c.reparam_scale)
    _check("depth_power", _is_number(c.depth_power) and 0 <= c.depth_power <= 4,
           "a number in [0, 4] (0: off)", c.depth_power)
    _check("ratio_step_knee", _is_number(c.ratio_step_knee) and 0 <= c.ratio_step_knee <= 5
           and (c.ratio_step_scale or not c.ratio_step_knee),
           "a number in [0, 5] (0: the factor is r), and above 0 only with ratio_step_scale",
           c.ratio_step_knee)
    _check("step_adaptation", _is_number(c.step_adaptation) and 0 <= c.step_adaptation <= 1,
           "a number in [0, 1] (0: off)", c.step_adaptation)
    _check("rms_decay", _is_number(c.rms_decay) and 0 < c.rms_decay < 1, "a number in (0, 1)",
           c.rms_decay)
    for name, hi in (("step_mult_prior", 1000), ("sigma_prior", 1)):
        value = getattr(c, name)
        _check(name, isinstance(value, tuple) and len(value) == 2
               and all(_is_number(v) and 0 < v <= hi for v in value) and value[0] <= value[1],
               f"a pair [low, high] with 0 < low <= high <= {hi}", value)
    _check("families", isinstance(c.families, tuple) and len(c.families) >= 1
           and all(f in TRAIN_FAMILIES for f in c.families),
           f"a non-empty list of training families from {list(TRAIN_FAMILIES)} "
           f"({list(HELDOUT_FAMILIES)} is held out)", c.families)
    return cfg


def _coerce(name: str, value: Any) -> Any:
    """JSON lists become tuples for tuple-typed fields; everything else is checked later."""
    if isinstance(value, list) and name in ("hidden", "families", "step_mult_prior",
                                            "sigma_prior"):
        return tuple(value)
    return value


def make_config(overrides: dict[str, Any] | None = None, file: Path | None = None, *,
                stored: bool = False) -> TrainConfig:
    """Defaults, then ``file`` (JSON object), then ``overrides``; validated.

    With ``stored``, the configuration is an existing run's (its ``config.json`` as ``file``, or
    a checkpoint's metadata as ``overrides``): the fields it lacks take their
    :data:`STORED_DEFAULTS` value, so a run from before a field existed is rebuilt as it was.

    Raises:
      ConfigError: an unknown field, an unreadable file, or an invalid value.
    """
    values: dict[str, Any] = dict(STORED_DEFAULTS) if stored else {}
    if file is not None:
        try:
            loaded = json.loads(Path(file).read_text())
        # ValueError: bad JSON, bad UTF-8, or an integer of 4,300+ digits; RecursionError:
        # nesting too deep for the parser.
        except (OSError, ValueError, RecursionError) as err:
            raise ConfigError(f"cannot read config file {file}: {_one_line(err)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {file} must hold a JSON object, not "
                              f"{type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides or {})
    if unknown := sorted(map(str, set(values) - set(FIELDS))):
        raise ConfigError(f"unknown config field(s) {_short_repr(unknown)}; valid fields: "
                          f"{sorted(FIELDS)}")
    return validate(TrainConfig(**{k: _coerce(k, v) for k, v in values.items()}))
