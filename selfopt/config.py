"""Configuration of a self-training run: the components' own frozen dataclasses, nested.

``TrainConfig`` holds the run's budget and bookkeeping and one section per component, each the
component itself (:class:`~selfopt.lopt.MLPLOpt`, the estimator, the outer optimizer,
:class:`~selfopt.population.PBT`, :class:`~selfopt.tasks.TaskDistribution`), so a field reaches
its component in one step and has one default, the component's. Every component checks its own
fields when it is built; this module only assembles them:

* from defaults, then a JSON file (``--config``; sections as nested objects), then overrides
  with dotted names (``--set lopt.hidden=[64,64]``);
* a section with several implementations picks one by its ``kind`` (``estimator.kind``:
  ``es`` or ``pes``; ``outer.kind``: ``self`` or ``adam``);
* a bad value raises :class:`ConfigError` with one line naming the field.

The run directory stores the final configuration as ``config.json`` (:meth:`TrainConfig.to_json`),
so a run can always be told apart and resumed.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from selfopt.checks import check_bool, check_int, check_number, one_line, require, short_repr
from selfopt.estimators import PES, TruncatedES
from selfopt.lopt import HierarchicalLOpt, MLPLOpt, ScheduledLOpt
from selfopt.population import PBT, AdamControl, SelfTraining
from selfopt.tasks import TaskDistribution

#: Section name -> its implementations (several: each names its ``kind``).
SECTIONS: dict[str, tuple[type, ...]] = {
    "lopt": (ScheduledLOpt, MLPLOpt, HierarchicalLOpt),
    "estimator": (TruncatedES, PES),
    "outer": (SelfTraining, AdamControl),
    "pbt": (PBT,),
    "tasks": (TaskDistribution,),
}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a self-training run (defaults: the laptop run).

    Attributes:
      population: members trained at once (method.md section 1).
      minutes: training-time budget (held-out checks are not counted).
      max_steps: outer-step budget; 0: until the time budget is spent.
      seed: every random choice of the run is a function of it and the outer step.
      lopt, estimator, outer, pbt, tasks: the components (see their classes).
      num_slots: tasks in flight; outer step ``t`` works on slot
        ``(t // steps_per_call) % num_slots`` (:mod:`selfopt.population.slots`).
      task_steps: outer steps a slot keeps its task before drawing a new one.
      steps_per_call: outer steps per compiled call (one task, no host round trip in between;
        for GPUs); failed members are replaced, and PBT runs, between calls.
      shards: blocks of members the ES work of an outer step is cut into, one compiled call
        each; the Ray backend runs them on its workers at once (docs/scaling.md). Results
        depend on ``shards`` (a block of fewer members rounds differently), never on where
        the blocks run.
      diverged_meta_loss: a member at or above this meta-loss (ratio scale: 1 = no progress) is
        replaced at once.
      validate_interval: outer steps between held-in validations (0: never); the best weights
        validated so far are the run's *elite*, the optimizer it hands you.
      validate_steps: inner steps of each validation problem.
      restore_elite: when no member validates as well as the elite, the elite replaces the
        worst member.
      eval_minutes: training minutes between checks of the elite against tuned Adam on the
        quick held-out suite (0: never).
      eval_steps, eval_seeds: inner steps and seeds of each such check.
      checkpoint_seconds: seconds between checkpoints (0: after every outer step).
      keep_checkpoints: checkpoints kept in the run directory.
    """

    population: int = 8
    minutes: float = 10.0
    max_steps: int = 0
    seed: int = 0
    lopt: MLPLOpt = dataclasses.field(default_factory=ScheduledLOpt)
    estimator: TruncatedES = dataclasses.field(default_factory=TruncatedES)
    outer: SelfTraining | AdamControl = dataclasses.field(default_factory=SelfTraining)
    pbt: PBT = dataclasses.field(default_factory=PBT)
    tasks: TaskDistribution = dataclasses.field(default_factory=TaskDistribution)
    num_slots: int = 2
    task_steps: int = 40
    steps_per_call: int = 1
    shards: int = 1
    diverged_meta_loss: float = 5.0
    validate_interval: int = 50
    validate_steps: int = 300
    restore_elite: bool = True
    eval_minutes: float = 2.0
    eval_steps: int = 300
    eval_seeds: int = 3
    checkpoint_seconds: float = 60.0
    keep_checkpoints: int = 2

    def __post_init__(self):
        # Upper bounds: far above any run a machine can hold, low enough that a typo (an extra
        # three zeros) is an error rather than an allocation that never finishes.
        for name, lo, hi in (("population", 2, 4096), ("num_slots", 1, 1024),
                             ("task_steps", 1, 1_000_000), ("steps_per_call", 1, 1000),
                             ("validate_interval", 0, 1_000_000),
                             ("validate_steps", 1, 1_000_000),
                             ("eval_steps", 10, 1_000_000), ("eval_seeds", 1, 1000),
                             ("keep_checkpoints", 1, 1000), ("max_steps", 0, 10**9),
                             ("shards", 1, 4096)):
            check_int(self, name, lo, hi)
        if self.population % self.shards:
            raise ValueError(f"shards must divide population ({self.population}) into equal "
                              f"blocks, got {self.shards}")
        if self.shards > 1 and self.steps_per_call > 1:
            raise ValueError("shards > 1 needs steps_per_call = 1 (a call of several steps "
                              "cannot leave its device between steps)")
        check_int(self, "seed", 0, 2**31 - 1)
        check_number(self, "minutes", 0, 60 * 24 * 30, open_low=True)
        check_number(self, "eval_minutes", 0, 60 * 24 * 30, note=" (0: never)")
        check_number(self, "diverged_meta_loss", 0, 1e6, open_low=True)
        check_number(self, "checkpoint_seconds", 0, 1e6, note=" (0: every step)")
        check_bool(self, "restore_elite")
        for name, classes in SECTIONS.items():
            require(name, isinstance(getattr(self, name), classes),
                    f"one of {[cls.__name__ for cls in classes]}", getattr(self, name))

    def to_json(self) -> dict[str, Any]:
        """The configuration as nested JSON (sections with several kinds name theirs)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in SECTIONS:
                section = {f.name: _jsonable(getattr(value, f.name))
                           for f in dataclasses.fields(value)}
                value = ({"kind": value.kind, **section} if len(SECTIONS[field.name]) > 1
                         else section)
            out[field.name] = value
        return out


TOP_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in SECTIONS)
DEFAULTS = TrainConfig()


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def field_names() -> list[str]:
    """Every configurable field, dotted (``lopt.hidden``), over all kinds of every section."""
    names = set(TOP_FIELDS)
    for section, classes in SECTIONS.items():
        for cls in classes:
            names.update(f"{section}.{f.name}" for f in dataclasses.fields(cls))
        if len(classes) > 1:
            names.add(f"{section}.kind")
    return sorted(names)


def _unknown(name: str) -> ConfigError:
    """The error for an unknown field, pointing at the dotted name a flat one moved to."""
    moved = [n for n in field_names() if n.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]]
    hint = f"; did you mean {' or '.join(map(repr, moved))}?" if moved else ""
    return ConfigError(f"unknown config field {short_repr(name)}{hint} (valid fields: "
                       f"{', '.join(field_names())})")


def _section(name: str, values: Any) -> Any:
    """The component of section ``name`` from its JSON object ``values``."""
    if not isinstance(values, dict):
        raise ConfigError(f"config field {name!r} must be an object of its fields, got "
                          f"{short_repr(values)}")
    classes, values = SECTIONS[name], dict(values)
    cls = type(getattr(DEFAULTS, name))
    if len(classes) > 1:
        kinds = {c.kind: c for c in classes}
        kind = values.pop("kind", cls.kind)
        if not isinstance(kind, str) or kind not in kinds:
            raise ConfigError(f"config field '{name}.kind' must be one of {list(kinds)}, got "
                              f"{short_repr(kind)}")
        cls = kinds[kind]
    allowed = {f.name for f in dataclasses.fields(cls)}
    for field in values:
        if field not in allowed:
            owners = [c.kind for c in classes if field in {f.name for f in dataclasses.fields(c)}]
            if owners:
                raise ConfigError(f"config field '{name}.{field}' belongs to {name}.kind="
                                  f"{' or '.join(owners)}, not {name}.kind={cls.kind}")
            raise _unknown(f"{name}.{field}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as err:
        raise _field_error(err, cls, f"{name}.") from None


def _field_error(err: Exception, cls: type, prefix: str) -> ConfigError:
    """A component's error ("hidden must be ...") as the configuration's, naming the field by
    its dotted name ("config field 'lopt.hidden' must be ...")."""
    text = one_line(err)
    first, _, rest = text.partition(" ")
    if first.rstrip(":") in {f.name for f in dataclasses.fields(cls)}:
        return ConfigError(f"config field '{prefix}{first.rstrip(':')}'"
                           f"{':' if first.endswith(':') else ''} {rest}")
    return ConfigError(f"config field {prefix.rstrip('.') or 'value'}: {text}")


def _merge(into: dict[str, Any], values: dict[str, Any], where: str) -> None:
    """Merges ``values`` (a JSON object, or dotted overrides) into the nested ``into``."""
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"config field names are strings, got {short_repr(key)}")
        section, dot, field = key.partition(".")
        if dot:
            if section not in SECTIONS or not field or "." in field:
                raise _unknown(key)
            into.setdefault(section, {})[field] = value
        elif key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"config field {key!r}{where} must be an object of its "
                                  f"fields, got {short_repr(value)}")
            into.setdefault(key, {}).update(value)
        elif key in TOP_FIELDS:
            into[key] = value
        else:
            raise _unknown(key)


def make_config(overrides: dict[str, Any] | None = None, file: Path | None = None,
                saved_run: bool = False) -> TrainConfig:
    """Defaults, then ``file`` (a JSON object), then ``overrides`` (dotted names); validated.

    ``saved_run``: ``file`` is a run directory's ``config.json``. Such a file names every
    section's kind, except in runs saved before the learned optimizer had kinds, which were
    all MLP runs: their ``lopt`` is read as ``kind=mlp``, not as today's default.

    Raises:
      ConfigError: an unknown field, an unreadable file, or an invalid value.
    """
    values: dict[str, Any] = {}
    if file is not None:
        try:
            loaded = json.loads(Path(file).read_text())
        # ValueError: bad JSON, bad UTF-8, or an integer of 4,300+ digits; RecursionError:
        # nesting too deep for the parser.
        except (OSError, ValueError, RecursionError) as err:
            raise ConfigError(f"cannot read config file {file}: {one_line(err, 160)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {file} must hold a JSON object, not "
                              f"{type(loaded).__name__}")
        if saved_run and isinstance(loaded.get("lopt"), dict) and "kind" not in loaded["lopt"]:
            loaded["lopt"] = {"kind": "mlp", **loaded["lopt"]}
        _merge(values, loaded, f" in {file}")
    _merge(values, overrides or {}, "")
    sections = {name: _section(name, values.pop(name)) for name in SECTIONS if name in values}
    try:
        return TrainConfig(**values, **sections)
    except (ValueError, TypeError) as err:
        raise _field_error(err, TrainConfig, "") from None
