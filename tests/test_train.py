"""``selfopt train``: bitwise resume, Ctrl-C checkpoint, non-finite members, config errors."""
import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from selfopt.cli import main
from selfopt.config import SECTIONS, ConfigError, TrainConfig, field_names, make_config
from selfopt.estimators import PES, TruncatedES
from selfopt.lopt import ScheduledLOpt
from selfopt.population import PBT, AdamControl, SelfTraining
from selfopt.tasks import TaskDistribution
from selfopt.population import slots
from selfopt.run_dir import open_checkpoint
from selfopt.train import bound_fraction, train
from selfopt.estimators.inner_problem import ratio_scale
from selfopt.train_step import estimate_and_update, initial_state, outer_steps, train_step

TINY = {"population": 4, "estimator.num_pairs": 1, "estimator.truncation_length": 5,
        "estimator.min_inner_length": 10, "estimator.max_inner_length": 30,
        "tasks.families": ["quadratic"], "num_slots": 1, "task_steps": 3, "pbt.interval": 2,
        "pbt.score_steps": 5, "validate_steps": 5, "lopt.hidden": [8],
        "checkpoint_seconds": 1000.0, "eval_minutes": 0}


def tiny(**changes):
    return make_config({**TINY, **changes})


def log_rows(run_dir, name):
    rows = [json.loads(line) for line in (run_dir / name).read_text().splitlines()]
    for row in rows:
        row.pop("elapsed", None)
    return rows


def test_stop_and_resume_equals_uninterrupted_bitwise(tmp_path):
    whole = train(tiny(max_steps=6), tmp_path / "whole")
    train(tiny(max_steps=3), tmp_path / "split")
    resumed = train(tiny(max_steps=6), tmp_path / "split", resume=True)
    assert whole["steps"] == resumed["steps"] == 6
    a, b = load_file(whole["checkpoint"]), load_file(resumed["checkpoint"])
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for name in ("metrics.jsonl", "lineage.jsonl"):
        assert log_rows(tmp_path / "whole", name) == log_rows(tmp_path / "split", name)


def test_a_config_field_reaches_its_component_in_one_hop():
    cfg = tiny(**{"lopt.hidden": [8, 4], "lopt.rms_decay": 0.99, "lopt.width_base": 16,
                  "estimator.kind": "pes", "estimator.log_floor": 1e-12, "outer.kind": "adam",
                  "outer.learning_rate": 0.01, "outer.max_update": 0.1, "pbt.interval": 7,
                  "tasks.grid": "full", "tasks.reparam_scale": 2.0})
    assert cfg.lopt == ScheduledLOpt(hidden=(8, 4), rms_decay=0.99, width_base=16)
    assert cfg.estimator == PES(num_pairs=1, truncation_length=5, min_inner_length=10,
                                max_inner_length=30, log_floor=1e-12)
    assert cfg.outer == AdamControl(learning_rate=0.01, max_update=0.1)
    assert cfg.pbt == PBT(interval=7, score_steps=5)
    assert cfg.tasks == TaskDistribution(("quadratic",), "full", 2.0)
    # a JSON file's nested sections mean the same as dotted overrides, and round-trip
    assert make_config({}, None) == TrainConfig()
    assert make_config(cfg.to_json()) == cfg


def test_no_component_default_disagrees_with_the_config():
    # One default per field: the run's defaults are the components' own.
    defaults = TrainConfig()
    for name, classes in SECTIONS.items():
        component = getattr(defaults, name)
        assert component == classes[0](), name
        for field in dataclasses.fields(component):
            assert getattr(component, field.name) == (
                field.default if field.default is not dataclasses.MISSING
                else field.default_factory()), f"{name}.{field.name}"
    assert isinstance(defaults.estimator, TruncatedES) and type(defaults.outer) is SelfTraining
    assert {"lopt.hidden", "outer.kind", "outer.policy", "outer.learning_rate",
            "estimator.kind", "pbt.interval", "tasks.families"} <= set(field_names())


@pytest.mark.parametrize("overrides, message", [
    ({"max_update": 0.01}, "did you mean 'outer.max_update'"),
    ({"outer.kind": "adam", "outer.policy": "best"}, "belongs to outer.kind=self"),
    ({"lopt.hidden": []}, "'lopt.hidden' must be"),
    ({"lopt.rms_decay": 1.0}, "'lopt.rms_decay' must be"),
    ({"lopt.width_base": -1}, "'lopt.width_base' must be"),
    ({"lopt.depth_power": 9}, "'lopt.depth_power' must be"),
    ({"estimator.kind": "sgd"}, "estimator.kind"),
    ({"estimator.log_floor": 0}, "'estimator.log_floor' must be"),
    ({"estimator.min_inner_length": 50, "estimator.max_inner_length": 40}, "max_inner_length"),
    ({"pbt.sigma_prior": [1, 0.1]}, "'pbt.sigma_prior' must be"),
    ({"tasks.families": ["autoencoder"]}, "held out"),
    ({"lopt": 3}, "'lopt' must be an object"),
    ({"outer.clip": float("nan")}, "'outer.clip' must be"),
])
def test_config_errors_name_the_dotted_field(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        make_config(overrides)
    assert "\n" not in str(err.value)


def test_a_run_of_the_flat_configuration_does_not_resume_silently(tmp_path, capsys):
    # Runs stored before the configuration had sections name fields that moved: resuming one
    # is a one-line error that says where the field went, and the run directory is untouched.
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"population": 4, "max_update": 0.003}))
    before = sorted(p.name for p in run_dir.iterdir())
    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "outer.max_update" in err
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_ctrl_c_stops_after_the_step_and_writes_a_checkpoint(tmp_path):
    def interrupt(info):
        if info["state"].step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    summary = train(tiny(max_steps=50), tmp_path / "run", on_step=interrupt)
    assert summary["interrupted"] and summary["steps"] == 2
    assert (tmp_path / "run" / "checkpoints" / "step-00000002.safetensors").is_file()
    resumed = train(tiny(max_steps=4), tmp_path / "run", resume=True)
    assert resumed["steps"] == 4 and not resumed["interrupted"]


def test_the_summary_reports_how_often_the_step_bound_shortened_a_step(tmp_path):
    rows = [{"step": s, "trust": t}
            for s, t in [(0, 1.0), (0, 0.5), (1, 1.0), (1, None), (2, 0.2), (2, 0.9)]]
    assert bound_fraction(rows) == pytest.approx(3 / 5)
    assert bound_fraction(rows, from_step=2) == 1.0 and bound_fraction([]) is None
    # a bound so small that it shortens every step, and one so large that it shortens none
    for cap, expected in ((1e-12, 1.0), (1e6, 0.0)):
        summary = train(tiny(max_steps=3, **{"outer.max_update": cap}), tmp_path / str(cap))
        assert summary["step_bound"] == {"all": expected, "last_third": expected}


def test_non_finite_member_is_replaced_at_once():
    cfg = tiny(max_steps=1)
    state = initial_state(cfg)
    state = state.replace(thetas=jax.tree.map(lambda x: x.at[1].set(jnp.nan), state.thetas))
    after, out = train_step(cfg, state)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(after.thetas))
    (event,) = out.logs["lineage.jsonl"]
    assert event["kind"] == "replace_non_finite" and event["position"] == 1
    assert after.lineage.ids[1] == event["child_id"] == 4 and event["parent_id"] != 1
    assert dict(after.lineage.counts) == {"replace_non_finite": 1}
    assert out.metrics["replaced"] == {1: "replace_non_finite"}
    # the step is pure: the state it was given is untouched
    assert state.lineage.ids == (0, 1, 2, 3) and state.step == 0
    assert bool(jnp.isnan(jax.tree.leaves(state.thetas)[0][1]).all())


def test_pbt_rounds_record_lineage_and_copy_weights(tmp_path):
    summary = train(tiny(max_steps=4, **{"pbt.resample_probability": 0.0}),
                      tmp_path / "run")
    events = log_rows(tmp_path / "run", "lineage.jsonl")
    assert [e["step"] for e in events] == [2, 4]  # one member replaced per round (25% of 4)
    for e in events:
        assert e["kind"] == "exploit" and e["parent_score"] <= e["replaced_score"]
        for name in ("step_mult", "sigma"):
            ratio = e["after"][name] / e["before"][name]
            assert min(abs(ratio - 0.8), abs(ratio - 1.25)) < 1e-4
    # The last round happened just before the final checkpoint: the child holds the parent's
    # weights and outer state exactly, and the replaced lineage id is gone.
    last = events[-1]
    arrays = load_file(summary["checkpoint"])
    copied = [n for n in arrays if n.startswith(("['thetas']", "['outer_state']"))]
    for name in copied:
        np.testing.assert_array_equal(arrays[name][last["position"]],
                                      arrays[name][last["parent_position"]])


@pytest.mark.parametrize("argv, field", [
    (["--population", "1"], "population"),
    (["--set", "estimator.num_pairs=0"], "estimator.num_pairs"),
    (["--set", "tasks.families=[\"autoencoder\"]"], "tasks.families"),
    (["--set", "outer.clip_relative=1"], "outer.clip_relative"),
    (["--set", "outer.clip=-1"], "outer.clip"),
    (["--set", "no_such_field=3"], "no_such_field"),
    (["--outer-optimizer", "sgd"], "outer-optimizer"),
    (["--minutes", "nan"], "minutes"),
])
def test_config_errors_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, argv, field):
    out = tmp_path / "run"
    try:
        code = main(["train", "--out", str(out), *argv])
    except SystemExit as exc:  # argparse's own errors (a choice outside the list)
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and field in err and err.count("\n") == 1, err
    assert not out.exists()


def test_resume_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a selfopt run directory" in capsys.readouterr().err


def damage(path, how):
    """Damages a checkpoint file in place, the ways a disk or a person can."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "flip_array":
        data[-5] ^= 0xFF  # one array byte: only the checksum can tell
    elif how == "flip_metadata":  # a digit of the JSON metadata: still valid JSON
        at = data.index(b'next_id\\": ') + len(b'next_id\\": ')
        data[at] = ord("9") if data[at] != ord("9") else ord("8")
    elif how == "random_bytes":
        data = bytearray(np.random.default_rng(0).bytes(len(data)))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip_array", "flip_metadata", "random_bytes"])
def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning(tmp_path, capsys, how):
    # Checkpoints after every step; keep 2: steps 2 and 3. Step 3 is damaged, so the resume
    # goes on from step 2 and must still reach the uninterrupted run's state bitwise.
    train(tiny(max_steps=3, checkpoint_seconds=0), tmp_path / "run")
    latest = tmp_path / "run" / "checkpoints" / "step-00000003.safetensors"
    damage(latest, how)
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet", "--max-steps", "5"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("selfopt: warning: skipping "
                                                   "step-00000003.safetensors"), err
    assert "resuming from step-00000002.safetensors" in err
    whole = train(tiny(max_steps=5, checkpoint_seconds=0), tmp_path / "whole")
    a = load_file(whole["checkpoint"])
    b = load_file(tmp_path / "run" / "checkpoints" / "step-00000005.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for name in ("metrics.jsonl", "lineage.jsonl"):
        assert log_rows(tmp_path / "whole", name) == log_rows(tmp_path / "run", name)


@pytest.mark.parametrize("how", ["truncate", "flip_array"])
def test_resume_with_every_checkpoint_damaged_is_a_clear_error(tmp_path, capsys, how):
    train(tiny(max_steps=3, checkpoint_seconds=0), tmp_path / "run")
    paths = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert len(paths) == 2
    for path in paths:
        damage(path, how)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("selfopt: error: no usable checkpoint"), err
    assert "step-00000003" in err and ("damaged" in err or "not a readable" in err), err
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing removed


def test_a_second_trainer_on_the_same_run_directory_is_refused(tmp_path, capsys):
    import fcntl

    train(tiny(max_steps=2), tmp_path / "run")
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    with open(tmp_path / "run" / ".lock") as held:  # a running trainer holds this lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "in use by another selfopt train" in err and err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before


def test_fused_steps_equal_one_step_at_a_time():
    """``outer_steps`` (one compiled scan) against the same steps one call each."""
    cfg = tiny()
    state = initial_state(cfg)
    task = slots.task(state.slot_configs[0])
    one = state.replace(step=5)
    for _ in range(3):
        one, history = estimate_and_update(cfg, one, 0, task)
        one = one.replace(step=one.step + 1)
    fused = outer_steps(cfg.lopt, cfg.estimator, cfg.outer, state.thetas, state.outer_state,
                        state.hparams, jnp.asarray(0), state.slot_problems[0], task, 0, 5, 3)
    raw = lambda x: (jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                     else x)
    for a, b in zip(jax.tree.leaves((one.thetas, one.outer_state, one.slot_problems[0])),
                    jax.tree.leaves(fused[:3])):
        np.testing.assert_allclose(np.asarray(raw(a), np.float64), np.asarray(raw(b), np.float64),
                                   rtol=1e-4, atol=1e-6)
    assert fused[3]["meta_loss"].shape == (3, 4)
    np.testing.assert_allclose(ratio_scale(fused[3]["meta_loss"][-1], cfg.estimator.normalization),
                               history["meta_loss"][-1], rtol=1e-4)


def test_fused_run_logs_every_step_and_resumes_bitwise(tmp_path):
    whole = train(tiny(max_steps=6, steps_per_call=3), tmp_path / "whole")
    train(tiny(max_steps=3, steps_per_call=3), tmp_path / "split")
    resumed = train(tiny(max_steps=6, steps_per_call=3), tmp_path / "split", resume=True)
    assert whole["steps"] == resumed["steps"] == 6
    a, b = load_file(whole["checkpoint"]), load_file(resumed["checkpoint"])
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    rows = log_rows(tmp_path / "whole", "metrics.jsonl")
    assert [r["step"] for r in rows] == [s for s in range(6) for _ in range(4)]
    assert rows == log_rows(tmp_path / "split", "metrics.jsonl")
    lineage = log_rows(tmp_path / "whole", "lineage.jsonl")
    assert {e["step"] for e in lineage if e["kind"] == "exploit"} == {3, 6}  # pbt_interval 2


def test_a_seeded_short_run_equals_the_run_recorded_before_the_refactor(tmp_path):
    # tests/data/recorded_run_80b245c.json: the same run at commit 80b245c (flat configuration,
    # options since removed, one compiled program per data set and activation). The computation
    # is unchanged, so the run is too, up to float rounding where XLA fuses the task buckets'
    # switches differently.
    recorded = json.loads((Path(__file__).parent / "data" / "recorded_run_80b245c.json")
                          .read_text())
    cfg = tiny(max_steps=6, minutes=60, validate_interval=3, validate_steps=20,
               num_slots=2, **{"lopt.kind": "mlp", "lopt.hidden": [32, 32],
                               "estimator.num_pairs": 2,
                               "tasks.families": ["quadratic", "mlp"],
                               "pbt.score_steps": 10})
    train(cfg, tmp_path / "run")
    rows = log_rows(tmp_path / "run", "metrics.jsonl")
    assert [r["task"] for r in rows] == recorded["task"]
    np.testing.assert_allclose([r["meta_loss"] for r in rows], recorded["meta_loss"], rtol=1e-5)
    lineage = log_rows(tmp_path / "run", "lineage.jsonl")
    assert [[e["kind"], e["position"], e["parent_id"]] for e in lineage] == recorded["lineage"]
    np.testing.assert_allclose([r["scores"] for r in log_rows(tmp_path / "run",
                                                               "validation.jsonl")],
                               recorded["validation"], rtol=1e-5)
    _, state, _ = open_checkpoint(tmp_path / "run")
    np.testing.assert_allclose(state.elite_score, recorded["elite_score"], rtol=1e-5)
    np.testing.assert_allclose([float(np.sum(np.asarray(x, np.float64)))
                                for x in jax.tree.leaves(state.thetas)],
                               recorded["theta_sums"], rtol=1e-3, atol=1e-3)


def test_a_run_of_the_previous_checkpoint_layout_resumes(tmp_path):
    # tests/data/run_632c2b2: a TINY run (2 steps, a PBT round each step) saved at commit
    # 632c2b2, whose checkpoints kept the replacement counts beside the run record.
    run_dir = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "data" / "run_632c2b2", run_dir)
    _, old, _ = open_checkpoint(run_dir)
    assert old.step == 2 and dict(old.lineage.counts) == {"exploit": 2}
    assert main(["train", "--resume", str(run_dir), "--quiet", "--max-steps", "3"]) == 0
    _, state, _ = open_checkpoint(run_dir)
    assert state.step == 3 and dict(state.lineage.counts) == {"exploit": 3}
    assert state.elite.id == old.elite.id or state.elite.score < old.elite.score


def test_shards_must_cut_the_population_evenly():
    with pytest.raises(ValueError, match="shards.* must divide population"):
        make_config({**TINY, "population": 4, "shards": 3})
    with pytest.raises(ValueError, match="steps_per_call = 1"):
        make_config({**TINY, "population": 4, "shards": 2, "steps_per_call": 2})
