"""A trained learned optimizer as a file to hand on, and back as an optax optimizer.

``selfopt export RUN`` writes the run's answer (its elite: the best held-in validation) as one
safetensors file (:mod:`selfopt.lopt_file`); :func:`load` turns any such file, and
:func:`pretrained` the one shipped inside the package, into an optax optimizer::

    opt = selfopt.pretrained(num_steps=1000)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params, loss=loss)
    params = optax.apply_updates(params, updates)
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from selfopt import lopt_file
from selfopt.config import ConfigError, make_config
from selfopt.lopt import LearnedOptimizer, check_theta
from selfopt.lopt_file import PRETRAINED, LOptFileError
from selfopt.population.elite import answer
from selfopt.provenance import provenance
from selfopt.run_dir import open_checkpoint

def architecture(lopt: LearnedOptimizer) -> dict[str, Any]:
    """``{"kind", "config"}``: what a loader needs, besides the weights, to rebuild ``lopt``."""
    return {"kind": lopt.kind,
            "config": {f.name: getattr(lopt, f.name) for f in dataclasses.fields(lopt)}}


def export(target: Path, out: Path | None = None, member: int | None = None
           ) -> tuple[Path, dict[str, Any]]:
    """Writes the answer of a run (or checkpoint file) ``target`` to ``out``.

    Args:
      target: a run directory (its latest checkpoint) or a checkpoint file.
      out: the file to write (default ``RUN/optimizer.safetensors``, beside the checkpoints'
        folder for a checkpoint file).
      member: a population position instead of the run's elite.

    Returns:
      The file written and its metadata.

    Raises:
      CheckpointError: no usable checkpoint at ``target``.
      ValueError: ``member`` is not a position of the population.
      OSError: ``out`` cannot be written (nothing there changed).
    """
    target = Path(target)
    cfg, state, path = open_checkpoint(target)
    theta, source, description = answer(state, member)
    run_dir = target if target.is_dir() else path.parent.parent
    meta = {
        "architecture": architecture(cfg.lopt),
        "description": f"{cfg.outer.label} {description} of run {run_dir.name}",
        "training": {**_read_json(run_dir / "provenance.json"), "seed": cfg.seed,
                     "outer_steps": state.step, "minutes": round(state.elapsed / 60, 2),
                     "checkpoint": path.name, **source, "config": cfg.to_json()},
        "evaluation": _evaluation(run_dir / "evaluation.json", source),
        "exported": provenance(),
    }
    out = Path(out) if out is not None else run_dir / "optimizer.safetensors"
    return out, lopt_file.write(out, theta, meta)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _evaluation(path: Path, source: dict[str, Any]) -> dict[str, Any] | None:
    """The run's saved evaluation (``selfopt eval RUN``) where it evaluated these weights."""
    saved = _read_json(path)
    if saved.get("member_id") != source["member_id"] or "summary" not in saved:
        return None
    return {"summary": saved["summary"],
            "tasks": [{k: t.get(k) for k in ("label", "normalized", "adam_normalized", "wins")}
                      for t in saved.get("tasks", [])]}


def read(path: Path) -> tuple[LearnedOptimizer, Any, dict[str, Any]]:
    """The architecture, weights and metadata of an exported file, checked.

    Raises:
      LOptFileError: the file cannot be used: missing, damaged, newer, of an unknown
        architecture, or with weights that do not fit its architecture.
    """
    arrays, meta = lopt_file.read(path)
    arch = meta["architecture"]
    try:
        lopt = make_config({"lopt": {"kind": arch["kind"], **arch["config"]}}).lopt
    except ConfigError as err:
        raise LOptFileError(f"{path}: this selfopt cannot build its architecture ({err})"
                            ) from None
    theta = jax.tree.map(jnp.asarray, lopt_file.unflatten(arrays))
    try:
        check_theta(lopt, theta)
    except ValueError as err:
        raise LOptFileError(f"{path}: {err}") from None
    return lopt, theta, meta


def load(path: Path, num_steps: int | None = None) -> optax.GradientTransformationExtraArgs:
    """The optax optimizer of an exported file (after :func:`read`'s checks, theta's included).

    Args:
      path: the ``.safetensors`` file ``selfopt export`` wrote.
      num_steps: the number of updates the run will take, for architectures that read the
        time left (the scheduled and hierarchical optimizers); the MLP ignores it.
    """
    lopt, theta, _ = read(path)
    return lopt.optimizer(theta, num_steps)


def pretrained(num_steps: int | None = None) -> optax.GradientTransformationExtraArgs:
    """The optax optimizer of the self-trained optimizer shipped with selfopt
    (``docs/pretrained.md`` is its card: how it was trained, where it wins and loses)."""
    return load(PRETRAINED, num_steps)
