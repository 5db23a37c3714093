"""Reliability: numerical faults, a full disk, leftovers of crashes, foreign checkpoints.

The crash harness (SIGKILL at random moments) is tests/test_crash.py; random configs and flags
are tests/test_fuzz.py. See docs/reliability.md for what is promised.
"""
import dataclasses
import errno
import json
import math
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from selfopt import checkpoint as ckpt
from selfopt.cli import main
from selfopt.estimators import TruncatedES
from selfopt.live_view import LiveView
import selfopt.train
from selfopt.population import Hyperparams, slots
from selfopt.population.state import Lineage
from selfopt.run_dir import RunDir, open_checkpoint
from selfopt.train import train
from selfopt.train_step import train_step
from test_train import TINY, log_rows, tiny

ROOT = Path(__file__).resolve().parents[1]


def tiny_argv(**changes) -> list[str]:
    """``--set`` flags of the TINY configuration (with changes) for ``selfopt train``."""
    return [arg for k, v in {**TINY, **changes}.items() for arg in ("--set", f"{k}={json.dumps(v)}")]


def assert_same_final_state(run_a: Path, run_b: Path, step: int) -> None:
    """Bitwise equal arrays of checkpoint ``step`` and equal logs (wall time aside)."""
    name = f"checkpoints/step-{step:08d}.safetensors"
    a, b = load_file(run_a / name), load_file(run_b / name)
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for log in ("metrics.jsonl", "lineage.jsonl"):
        assert log_rows(run_a, log) == log_rows(run_b, log), log


def temp_files(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*") if ".tmp-" in p.name]


# -- numerical faults -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NaNEstimateES(TruncatedES):
    """Fault injection: the ES estimate of any member whose sigma exceeds 0.5 is NaN."""

    def estimate(self, lopt, task, theta, sigma, state, key):
        estimate, state = super().estimate(lopt, task, theta, sigma, state, key)
        grad = jax.tree.map(lambda g: jnp.where(sigma > 0.5, jnp.nan, g), estimate.grad)
        return estimate._replace(grad=grad), state


def member_set(tree, member, value):
    """``tree`` with every leaf's row ``member`` set to ``value``."""
    return jax.tree.map(lambda x: x.at[member].set(value) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, tree)


def inject(cfg, state, fault: str):
    """Puts one numerical fault into member 1 (or, for ``task_nan``, into every member's task);
    returns the configuration and state of the faulty step."""
    if fault == "weights_nan":
        return cfg, state.replace(thetas=member_set(state.thetas, 1, jnp.nan))
    if fault == "weights_inf":
        return cfg, state.replace(thetas=member_set(state.thetas, 1, jnp.inf))
    if fault == "outer_state_nan":
        return cfg, state.replace(outer_state=member_set(state.outer_state, 1, jnp.nan))
    if fault in ("task_loss_nan", "task_loss_inf"):
        # Member 1's inner problems: parameters that make its task's loss NaN / Inf (and a step
        # of 0 so that no scheduled restart replaces them first).
        slot, problems = slots.slot_of(cfg, state.step), list(state.slot_problems)
        inner = problems[slot]
        value = jnp.nan if fault == "task_loss_nan" else jnp.inf
        problems[slot] = inner._replace(params=member_set(inner.params, 1, value),
                                        step=inner.step.at[1].set(0))
        return cfg, state.replace(slot_problems=tuple(problems))
    if fault == "es_estimate_nan":
        est = cfg.estimator
        faulty = NaNEstimateES(**{f.name: getattr(est, f.name) for f in dataclasses.fields(est)})
        return dataclasses.replace(cfg, estimator=faulty), state.replace(hparams=Hyperparams(
            state.hparams.log_step_mult, state.hparams.log_sigma.at[1].set(0.0)))  # sigma 1
    raise ValueError(fault)


def fault_at(monkeypatch, step: int, fault: str) -> None:
    """The training loop's outer step ``step`` gets ``fault`` (:func:`inject`)."""
    def faulty_step(cfg, state, backend):
        if state.step == step:
            cfg, state = inject(cfg, state, fault)
        return train_step(cfg, state, backend)

    monkeypatch.setattr(selfopt.train, "train_step", faulty_step)


EXPECTED_KIND = {"weights_nan": "replace_non_finite", "weights_inf": "replace_non_finite",
                 "outer_state_nan": "replace_non_finite", "es_estimate_nan": "replace_non_finite",
                 "task_loss_nan": "replace_diverged", "task_loss_inf": "replace_diverged"}


@pytest.mark.parametrize("fault", sorted(EXPECTED_KIND))
def test_a_numerical_fault_replaces_the_member_and_the_run_goes_on(tmp_path, monkeypatch,
                                                                   fault):
    infos = []

    def on_step(info):
        infos.append({"step": info["state"].step, "replaced": info["metrics"]["replaced"],
                      "replacements": dict(info["state"].lineage.counts)})

    fault_at(monkeypatch, 2, fault)
    summary = train(tiny(max_steps=5), tmp_path / "run", on_step=on_step)
    kind = EXPECTED_KIND[fault]
    assert summary["steps"] == 5 and not summary["interrupted"]
    # The final state is finite everywhere.
    for name, array in load_file(summary["checkpoint"]).items():
        if array.dtype.kind == "f":
            assert np.isfinite(array).all(), name
    # The event: in the lineage, in the metrics row of that member and step, in the running
    # counts (on_step info and checkpoint), and the step after it is clean.
    events = [e for e in log_rows(tmp_path / "run", "lineage.jsonl") if e["kind"] != "exploit"]
    assert [(e["step"], e["position"], e["kind"]) for e in events] == [(2, 1, kind)]
    rows = {(r["step"], r["member"]): r for r in log_rows(tmp_path / "run", "metrics.jsonl")}
    assert rows[2, 1]["replaced"] == kind and rows[2, 0]["replaced"] is None
    assert all(r["replaced"] is None for (step, _), r in rows.items() if step != 2)
    by_step = {i["step"]: i for i in infos}
    assert by_step[3]["replaced"] == {1: kind} and by_step[3]["replacements"].get(kind) == 1
    assert kind not in by_step[2]["replacements"]
    assert ckpt.read_metadata(summary["checkpoint"])["run"]["replacements"][kind] == 1
    if kind == "replace_diverged":
        # A diverging inner task does not poison the estimate: its loss counts as the cap.
        assert rows[2, 1]["meta_loss"] == pytest.approx(TINY.get("loss_cap", 10.0), rel=1e-5)
        assert math.isfinite(rows[2, 1]["grad_rms"])


def test_a_task_whose_loss_is_nan_for_everyone_gives_capped_finite_losses(tmp_path,
                                                                          monkeypatch):
    make = slots.task

    def poisoned(config):
        task = make(config)
        return dataclasses.replace(task, target=task.target * jnp.nan)

    def step(cfg, state, backend):  # outer step 2's task is poisoned
        monkeypatch.setattr(slots, "task", poisoned if state.step == 2 else make)
        return train_step(cfg, state, backend)

    monkeypatch.setattr(selfopt.train, "train_step", step)
    # reparam_scale=1: plain quadratics, whose target the poison replaces
    summary = train(tiny(max_steps=4, **{"pbt.interval": 100, "tasks.reparam_scale": 1}),
                    tmp_path / "run")
    assert summary["steps"] == 4
    rows = [r for r in log_rows(tmp_path / "run", "metrics.jsonl") if r["step"] == 2]
    # the cap, not NaN (exp(log 10) in float32 with the default log normalisation)
    assert [r["meta_loss"] for r in rows] == pytest.approx([10.0] * TINY["population"], rel=1e-5)
    assert all(math.isfinite(r["grad_rms"]) and r["replaced"] is None for r in rows)
    for name, array in load_file(summary["checkpoint"]).items():
        if array.dtype.kind == "f":
            assert np.isfinite(array).all(), name


def test_replacements_are_shown_in_the_live_view(tmp_path, capsys, monkeypatch):
    fault_at(monkeypatch, 1, "weights_nan")
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--max-steps", "3", *tiny_argv()]) == 0
    err = capsys.readouterr().err
    assert "replaced: non-finite 1, diverged 0" in err, err
    # The counts survive a resume: the view of the resumed run starts from them.
    monkeypatch.setattr(selfopt.train, "train_step", train_step)
    assert main(["train", "--resume", str(out), "--max-steps", "4"]) == 0
    assert "replaced: non-finite 1" in capsys.readouterr().err


def test_live_view_footer_counts_every_kind():
    view = LiveView("self-training", 60.0, stream=__import__("io").StringIO())
    lineage = Lineage((0, 1), (0, 0), 2, (("exploit", 11), ("replace_diverged", 3),
                                           ("replace_non_finite", 2)))
    state = type("S", (), {"step": 7, "elapsed": 3.0, "start_meta_loss": 1.0,
                           "lineage": lineage})()
    view.update({"state": state, "inner_steps": 10, "inner_steps_per_s": 100.0,
                 "metrics": {"meta_loss": np.array([0.5, 0.7]), "finite": np.array([True, True]),
                             "trust": np.array([1.0, 0.5]), "replaced": {0: "replace_diverged"}}})
    line = view.stream.getvalue()
    assert line.count("\n") == 1
    assert "replaced: non-finite 2, diverged 3 | PBT copies 11" in line
    assert "bound 50% of steps (last 1)" in line  # one of the two members' steps was shortened


# -- disk full, half-written logs, leftovers of crashes -------------------------------------

def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, capsys,
                                                                     monkeypatch):
    real_fsync, writes = os.fsync, []

    def fsync(fd):  # the third checkpoint write finds the disk full
        if re.search(r"/\.step-\d+\.safetensors\.tmp-\d+$", os.readlink(f"/proc/self/fd/{fd}")):
            writes.append(fd)
            if len(writes) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--quiet", "--max-steps", "5",
            *tiny_argv(checkpoint_seconds=0)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("selfopt: error: cannot write checkpoint "), err
    assert "step-00000003.safetensors: No space left on device" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000001.safetensors", "step-00000002.safetensors"]
    for path in (out / "checkpoints").iterdir():
        ckpt.read_metadata(path)  # verifies
    assert temp_files(out) == []
    # Space again: the run resumes from step 2 and ends where an uninterrupted run ends.
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    train(tiny(max_steps=5, checkpoint_seconds=0), tmp_path / "whole")
    assert_same_final_state(tmp_path / "whole", out, 5)


def test_a_half_written_log_line_and_stale_temp_files_are_cleared_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny(max_steps=3), out)
    with open(out / "metrics.jsonl", "a") as f:  # a crash (or a full disk) mid-append
        f.write('{"step": 3, "elapsed": 1.2, "mem')
    garbage = [out / "checkpoints" / ".step-00000009.safetensors.tmp-4242",
               out / ".metrics.jsonl.tmp-4242", out / ".config.json.tmp-4242"]
    for path in garbage:
        path.write_bytes(b"half a write")
    assert main(["train", "--resume", str(out), "--quiet", "--max-steps", "5"]) == 0
    assert capsys.readouterr().err == ""
    assert temp_files(out) == []
    train(tiny(max_steps=5), tmp_path / "whole")
    assert_same_final_state(tmp_path / "whole", out, 5)


def test_a_run_stopped_before_its_first_checkpoint_starts_again_from_step_0(tmp_path, capsys):
    train(tiny(max_steps=2), tmp_path / "whole")
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.json").write_bytes((tmp_path / "whole" / "config.json").read_bytes())
    (out / "metrics.jsonl").write_text('{"step": 0, "member": 0}\n')  # logged, not saved
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint yet" in err and "step 0" in err
    assert_same_final_state(tmp_path / "whole", out, 2)


def test_a_directory_holding_only_a_lock_can_be_reused_but_a_file_cannot(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").touch()  # killed before it wrote its config: nothing to resume
    assert main(["train", "--out", str(out), "--quiet", "--max-steps", "1", *tiny_argv()]) == 0
    assert (out / "checkpoints" / "step-00000001.safetensors").is_file()
    capsys.readouterr()
    (tmp_path / "file").write_text("x")
    assert main(["train", "--out", str(tmp_path / "file"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err
    assert main(["train", "--out", str(out), "--quiet"]) == 2  # now it holds a run
    assert "already holds a run" in capsys.readouterr().err


# -- checkpoints from elsewhere ------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished TINY run (step 2) to take checkpoints from."""
    out = tmp_path_factory.mktemp("saved") / "run"
    train(tiny(max_steps=2), out)
    return out


def resume_error(run: Path, capsys) -> str:
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("selfopt: error: "), err
    return err


def test_a_checkpoint_of_another_architecture_is_a_clear_error(saved_run, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for path in (saved_run / "checkpoints").iterdir():
        (run / "checkpoints" / path.name).write_bytes(path.read_bytes())
    config = json.loads((saved_run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "lopt": {**config["lopt"],
                                                                     "hidden": [16]}}))
    err = resume_error(run, capsys)
    assert "another architecture" in err and "no usable checkpoint" in err


def test_a_checkpoint_of_another_schema_version_is_a_clear_error(saved_run, tmp_path, capsys,
                                                                  monkeypatch):
    cfg, state, _ = open_checkpoint(saved_run)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_bytes((saved_run / "config.json").read_bytes())
    monkeypatch.setattr(ckpt, "SCHEMA_VERSION", 99)
    RunDir(run).save(cfg, state)
    monkeypatch.undo()
    err = resume_error(run, capsys)
    assert "schema version 99" in err and "reads versions [1, 2]" in err


def test_a_version_1_checkpoint_still_loads(saved_run, tmp_path, monkeypatch):
    cfg, state, _ = open_checkpoint(saved_run)
    writer = RunDir(tmp_path / "run")
    monkeypatch.setattr(ckpt, "SCHEMA_VERSION", 1)  # checksum of the arrays only
    path = writer.save(cfg, state)
    monkeypatch.undo()
    assert ckpt.read_metadata(path)["run"]["step"] == 2
    loaded = writer.load(cfg, path)
    for a, b in zip(jax.tree.leaves(state.thetas), jax.tree.leaves(loaded.thetas)):
        np.testing.assert_array_equal(a, b)


def test_files_that_are_not_selfopt_checkpoints_are_clear_errors(saved_run, tmp_path):
    cfg, run = tiny(max_steps=2), RunDir(saved_run)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, foreign)  # safetensors, not ours
    bogus = tmp_path / "bogus.safetensors"  # ours, checksum fine, not a run state
    ckpt.save_checkpoint(bogus, {"x": np.zeros(3, np.float32)}, {"run": {"step": "x"}})
    text = tmp_path / "text.safetensors"
    text.write_text("print('hello')\n")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    expected = {foreign: "not a readable selfopt checkpoint",
                bogus: "does not hold a selfopt run state",
                text: "not a readable selfopt checkpoint",
                empty: "not a readable selfopt checkpoint",
                tmp_path / "missing.safetensors": "no checkpoint at"}
    for path, message in expected.items():
        with pytest.raises(ckpt.CheckpointError, match=message) as info:
            run.load(cfg, path)
        assert "\n" not in str(info.value)


def test_nothing_in_the_package_can_unpickle():
    """Loading a checkpoint or a data file must never be able to run code: no pickle, no
    ``allow_pickle=True``, every ``np.load`` with ``allow_pickle=False``, no eval/exec."""
    forbidden = re.compile(r"\bimport (c?pickle|dill|cloudpickle|marshal|shelve)\b|"
                           r"\bfrom (c?pickle|dill|cloudpickle|marshal|shelve) import\b|"
                           r"allow_pickle\s*=\s*True|(?<!selfopt\.)torch\.load|\beval\(|\bexec\(|"
                           r"yaml\.load\(|pd\.read_pickle")
    files = sorted((ROOT / "selfopt").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
    assert len(files) > 20
    for path in files:
        text = path.read_text()
        assert not forbidden.search(text), f"{path}: {forbidden.search(text).group(0)}"
        for call in re.finditer(r"np\.load\(([^)]*)\)", text):
            assert "allow_pickle=False" in call.group(1), f"{path}: {call.group(0)}"
