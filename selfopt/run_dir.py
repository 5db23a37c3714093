"""A run directory on disk: its lock, logs, checkpoints and summary.

    RUN/config.json          the configuration (written once, atomically)
    RUN/provenance.json      the command, commit and date that started the run
    RUN/metrics.jsonl        one row per outer step and member
    RUN/lineage.jsonl        every copy of a member over another (PBT, replacements, elite)
    RUN/validation.jsonl     every held-in validation
    RUN/eval.jsonl           every held-out check during training
    RUN/checkpoints/step-N.safetensors
    RUN/summary.json

Checkpoints are atomic safetensors files with a checksum; each records the byte size of every
log at its moment, so resuming cuts the logs back to exactly what that state had written. One
process at a time trains in a directory (an OS lock, dropped if the process dies).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from selfopt import checkpoint as ckpt
from selfopt import safe_io
from selfopt.config import ConfigError, TrainConfig, make_config
from selfopt.population import Hyperparams, slots
from selfopt.population.state import PopulationState, member_slice

LOGS = ("metrics.jsonl", "lineage.jsonl", "eval.jsonl", "validation.jsonl")


class RunInUseError(RuntimeError):
    """Another ``selfopt train`` holds the run directory."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's log file (``[]`` if there is none yet)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunDir:
    """The files of one run. Only the process holding :meth:`lock` writes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"

    @contextlib.contextmanager
    def lock(self):
        """Holds an exclusive lock on ``RUN/.lock`` so that two trainers never interleave
        writes in one run directory; the OS drops it if the process dies.

        Raises:
          RunInUseError: another process holds it.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunInUseError(f"{self.path} is in use by another selfopt train; wait for "
                                    "it or stop it first") from None
            yield self
        finally:
            os.close(fd)

    def write_json(self, name: str, value: Any) -> None:
        safe_io.atomic_write_bytes(self.path / name, (json.dumps(value, indent=2) + "\n").encode())

    def append(self, logs: dict[str, list[dict]]) -> None:
        """Appends rows to log files (name -> rows)."""
        for name, rows in logs.items():
            if rows:
                with open(self.path / name, "a") as f:
                    f.writelines(json.dumps(row) + "\n" for row in rows)

    def read(self, name: str) -> list[dict[str, Any]]:
        return read_jsonl(self.path / name)

    def checkpoints(self) -> list[Path]:
        """The run's checkpoint files, oldest first (never a temporary file of a write)."""
        steps = {p: p.name[len("step-"):-len(".safetensors")]
                 for p in self.ckpt_dir.glob("step-*.safetensors")}
        return sorted((p for p, n in steps.items() if n.isdigit()), key=lambda p: int(steps[p]))

    def save(self, cfg: TrainConfig, state: PopulationState) -> Path:
        """Writes ``state`` as checkpoint ``step-N`` (atomically), then tidies the folders.

        The metadata also records the byte size of every ``*.jsonl`` log at this moment (the
        log lines a resume from this checkpoint keeps). Tidying removes temporary files of
        writes that a crash cut short, checkpoints of later steps (a timeline abandoned by
        resuming from an older, good checkpoint) and all but the newest ``keep_checkpoints``.

        Raises:
          CheckpointError: the write failed (a full disk); earlier checkpoints are intact.
        """
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = self.ckpt_dir / f"step-{state.step:08d}.safetensors"
        logs = {name: (self.path / name).stat().st_size for name in LOGS
                if (self.path / name).exists()}
        ckpt.save_checkpoint(path, state.arrays(), {"config": cfg.to_json(),
                                                    "run": state.metadata(), "logs": logs})
        safe_io.remove_temp_files(self.ckpt_dir, "step-*.safetensors")
        for name in ("config.json", "provenance.json", "*.jsonl"):
            safe_io.remove_temp_files(self.path, name)
        paths = self.checkpoints()
        for later in paths[paths.index(path) + 1:]:
            later.unlink(missing_ok=True)
        for old in paths[:paths.index(path) + 1][:-cfg.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    def load(self, cfg: TrainConfig, path: Path) -> PopulationState:
        """The state stored in one checkpoint file of configuration ``cfg``.

        Raises:
          CheckpointError: unreadable, damaged, another schema version, or saved by another
            configuration (architecture, population size).
        """
        meta = ckpt.read_metadata(path)
        try:
            run = meta["run"]
            template = _template(cfg, run["slot_configs"], run["elite_id"] >= 0)
            arrays, _ = ckpt.load_checkpoint(path, template)
            # checkpoints of 35feeb9-632c2b2 kept the replacement counts beside ``run``
            return PopulationState.from_checkpoint(arrays, run, meta.get("replacements"))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            # The checksum held, so the file is as written, but not by this selfopt's trainer.
            raise ckpt.CheckpointError(f"{path} does not hold a selfopt run state ({err!r})"
                                       ) from None

    def load_latest(self, cfg: TrainConfig) -> tuple[PopulationState, Path] | None:
        """The state of the newest checkpoint that verifies, and its file (``None``: no
        checkpoint yet).

        A damaged newest checkpoint (bad checksum, truncated, unreadable) is skipped with a
        one-line warning on stderr and the previous one is used.

        Raises:
          CheckpointError: checkpoints exist but none is usable; the message says why for the
            newest.
        """
        paths, errors = self.checkpoints(), []
        for path in reversed(paths):
            try:
                state = self.load(cfg, path)
            except ckpt.CheckpointError as err:
                errors.append(err)
                continue
            if errors:
                skipped = ", ".join(p.name for p in paths[len(paths) - len(errors):])
                ckpt.warn(f"skipping {skipped} ({errors[0]}); resuming from {path.name}")
            return state, path
        if not errors:
            return None
        older = f" (and the {len(errors) - 1} older ones)" if len(errors) > 1 else ""
        raise ckpt.CheckpointError(f"no usable checkpoint to resume from: {errors[0]}{older}")

    def truncate_logs(self, checkpoint: Path | None) -> None:
        """Drops log lines written after ``checkpoint`` (the one resumed from).

        A checkpoint records each log's size when it was written, and the logs are cut back to
        exactly that: this keeps the PBT round logged at its step just before it and drops a
        line that a crash or a full disk cut short. Without a checkpoint (a run stopped before
        its first), every log starts empty.

        Raises:
          CheckpointError: the checkpoint does not record its logs' sizes.
        """
        sizes = ckpt.read_metadata(checkpoint).get("logs") if checkpoint else {}
        if not isinstance(sizes, dict):
            raise ckpt.CheckpointError(f"{checkpoint} does not record the sizes of the run's "
                                       "logs (saved by an older selfopt); cannot resume from it")
        for name in LOGS:
            log = self.path / name
            if log.exists() and log.stat().st_size != sizes.get(name, 0):
                safe_io.atomic_write_bytes(log, log.read_bytes()[:sizes.get(name, 0)])


def _template(cfg: TrainConfig, slot_configs: list[dict], elite: bool) -> dict[str, Any]:
    """Arrays with the structure a checkpoint of these slot tasks (and an elite, or not) has."""
    thetas = jax.vmap(cfg.lopt.init)(jax.random.split(jax.random.key(0), cfg.population))
    outer_state = cfg.outer.init(cfg.lopt, thetas)
    template = {"thetas": thetas, "outer_state": outer_state,
                "hparams": Hyperparams(*[jnp.zeros(cfg.population, jnp.float32)] * 2),
                "slots": [slots.init_problems(cfg.lopt, cfg.estimator, slots.task(c), thetas,
                                              jax.random.key(0)) for c in slot_configs]}
    if elite:
        template["elite"] = member_slice({"theta": thetas, "outer_state": outer_state}, 0)
    return template


def open_checkpoint(target: Path) -> tuple[TrainConfig, PopulationState, Path]:
    """A trained population from a run directory (its latest checkpoint) or a checkpoint file.

    Returns:
      The run's configuration, the state, and the file read.

    Raises:
      CheckpointError: no such run or file, or a damaged or incompatible checkpoint.
    """
    target = Path(target)
    if target.is_dir():
        if not (target / "config.json").is_file():
            raise ckpt.CheckpointError(f"{target} is not a selfopt run directory (no config.json)")
        cfg = make_config({}, target / "config.json", saved_run=True)
        latest = RunDir(target).load_latest(cfg)
        if latest is None:
            raise ckpt.CheckpointError(f"{target} has no checkpoint yet")
        return cfg, *latest
    if not target.is_file():
        raise ckpt.CheckpointError(f"no run directory or checkpoint file at {target}")
    try:
        cfg = make_config(ckpt.read_metadata(target)["config"])
    except (KeyError, TypeError, ConfigError) as err:
        raise ckpt.CheckpointError(f"{target} is not a selfopt training checkpoint ({err})"
                                   ) from None
    return cfg, RunDir(target.parent.parent).load(cfg, target), target
