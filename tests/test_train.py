"""``selfopt train``: bitwise resume, Ctrl-C checkpoint, non-finite members, config errors."""
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from selfopt.cli import main
from selfopt.config import ConfigError, make_config
from selfopt.lopt import MLPLOpt
from selfopt.train import Trainer, build, open_checkpoint

TINY = {"population": 4, "num_pairs": 1, "truncation_length": 5, "min_inner_length": 10,
        "max_inner_length": 30, "families": ["quadratic"], "num_slots": 1, "task_steps": 3,
        "pbt_interval": 2, "score_steps": 5, "summary_steps": 5, "validate_steps": 5,
        "hidden": [8], "checkpoint_seconds": 1000.0, "eval_minutes": 0}


def tiny(**changes):
    return make_config({**TINY, **changes})


def log_rows(run_dir, name):
    rows = [json.loads(line) for line in (run_dir / name).read_text().splitlines()]
    for row in rows:
        row.pop("elapsed", None)
    return rows


def test_stop_and_resume_equals_uninterrupted_bitwise(tmp_path):
    whole = Trainer(tiny(max_steps=6), tmp_path / "whole").run()
    Trainer(tiny(max_steps=3), tmp_path / "split").run()
    resumed = Trainer(tiny(max_steps=6), tmp_path / "split").run(resume=True)
    assert whole["steps"] == resumed["steps"] == 6
    a, b = load_file(whole["checkpoint"]), load_file(resumed["checkpoint"])
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for name in ("metrics.jsonl", "lineage.jsonl"):
        assert log_rows(tmp_path / "whole", name) == log_rows(tmp_path / "split", name)


def test_a_run_stored_before_raw_adam_features_resumes_and_opens_as_it_was(tmp_path):
    # A run from before the field existed has no "raw_adam_features" in its config.json: it
    # was built without those features, and must still resume and open (not be rebuilt with
    # today's default, whose weights have another shape).
    run_dir = tmp_path / "old"
    Trainer(tiny(max_steps=2, raw_adam_features=False, width_base=0, clip_relative=False,
                 clip=0.1, depth_power=0), run_dir).run()
    stored = json.loads((run_dir / "config.json").read_text())
    for field in ("raw_adam_features", "width_base", "clip_relative", "depth_power"):
        del stored[field]
    (run_dir / "config.json").write_text(json.dumps(stored))
    assert main(["train", "--resume", str(run_dir), "--set", "max_steps=4", "--quiet"]) == 0
    trainer, state, path = open_checkpoint(run_dir)
    assert not trainer.cfg.raw_adam_features and state.step == 4
    assert trainer.cfg.width_base == 0 and trainer.comps.lopt.width_base == 0  # nor width scaling
    assert trainer.cfg.depth_power == 0 and trainer.comps.lopt.depth_power == 0  # nor depth
    assert not trainer.comps.outer.clip_relative and trainer.comps.outer.clip == 0.1  # absolute
    assert trainer.comps.lopt.num_features == MLPLOpt(raw_adam_features=False).num_features
    assert load_file(path)["['thetas']['layers'][0]['w']"].shape == (4, 22, 8)
    # a fresh configuration takes today's default
    assert make_config({}).raw_adam_features and MLPLOpt().raw_adam_features
    assert make_config({}).width_base == MLPLOpt().width_base == 32
    assert make_config({}).depth_power == MLPLOpt().depth_power == 1.5
    assert make_config({}).clip_relative and make_config({}).clip == 3.0


def test_the_learned_optimizer_fields_of_the_config_build_it():
    comps = build(tiny(hidden=[8, 4], raw_adam_features=False, magnitude_features=False,
                       horizon_features=True, tensor_features=True, outer_horizon=500,
                       bias_correction=True, rms_decay=0.99, exp_mult=0.1,
                       loss_features=True, feature_eps=1e-20, width_base=16,
                       depth_features=True, depth_power=0.5, ratio_step_scale=True,
                       ratio_step_knee=0.3, step_adaptation=0.05, step_schedule="linear"))
    lopt = comps.lopt
    assert (lopt.eps, lopt.width_base, lopt.depth_features, lopt.depth_power,
            lopt.ratio_step_scale, lopt.ratio_step_knee, lopt.step_adaptation,
            lopt.step_schedule) == (1e-20, 16, True, 0.5, True, 0.3, 0.05, "linear")
    assert (lopt.hidden, lopt.raw_adam_features, lopt.magnitude_features, lopt.horizon_features,
            lopt.tensor_features, lopt.bias_correction, lopt.rms_decay, lopt.exp_mult,
            lopt.loss_features) == ((8, 4), False, False, True, True, True, 0.99, 0.1, True)
    assert comps.outer.horizon == 500
    assert build(tiny()).lopt == MLPLOpt(hidden=(8,))  # the defaults are MLPLOpt's
    with pytest.raises(ConfigError, match="outer_horizon"):
        make_config({"outer_horizon": 0})
    with pytest.raises(ConfigError, match="rms_decay"):
        make_config({"rms_decay": 1.0})
    for field, bad in (("width_base", -1), ("width_base", 1.5), ("feature_eps", 0.0),
                       ("depth_power", -0.5), ("depth_power", 9), ("ratio_step_scale", 1),
                       ("ratio_step_knee", 0.3), ("ratio_step_knee", -1),
                       ("step_adaptation", -0.1), ("step_adaptation", 2), ("step_adaptation", True),
                       ("step_schedule", "cosine"), ("step_schedule", 1)):
        with pytest.raises(ConfigError, match=field):
            make_config({field: bad})


@pytest.mark.slow  # an option that is off by default (its unit tests are not slow)
def test_a_horizon_run_tells_each_inner_problem_its_length_and_resumes(tmp_path):
    # Each inner problem's optimizer state holds its own sampled length as the horizon; the
    # members' own outer state holds outer_horizon. The extra state survives a checkpoint.
    run_dir = tmp_path / "horizon"
    Trainer(tiny(max_steps=2, horizon_features=True, outer_horizon=77), run_dir).run()
    assert main(["train", "--resume", str(run_dir), "--set", "max_steps=3", "--quiet"]) == 0
    trainer, state, _ = open_checkpoint(run_dir)
    assert state.step == 3
    np.testing.assert_array_equal(state.outer_state.horizon, 77.0)
    for inner in state.slot_inner:
        np.testing.assert_array_equal(inner.opt_state.horizon, inner.length.astype(np.float32))


@pytest.mark.slow  # an option that is off by default (its unit tests are not slow)
def test_a_loss_features_run_tracks_inner_and_meta_losses_and_resumes(tmp_path):
    # The inner problems' LOs track their training loss; the members' own outer state tracks
    # their meta-losses (log-normalised: below 0 once a member makes progress). Both survive
    # a checkpoint.
    run_dir = tmp_path / "loss"
    Trainer(tiny(max_steps=2, loss_features=True), run_dir).run()
    assert main(["train", "--resume", str(run_dir), "--set", "max_steps=3", "--quiet"]) == 0
    _, state, _ = open_checkpoint(run_dir)
    assert state.step == 3
    outer = np.asarray(state.outer_state.loss_stats)
    assert outer.shape == (4, 3) and np.all(np.isfinite(outer)) and np.all(outer[:, 2] > 0)
    assert np.all(state.outer_state.step == 3)
    for inner in state.slot_inner:
        stats = np.asarray(inner.opt_state.loss_stats)
        assert np.all(np.isfinite(stats)) and np.all(stats[..., 1] > 0)


@pytest.mark.slow  # an option that is off by default (its unit tests are not slow)
def test_a_step_adapting_run_carries_its_scales_and_resumes_bitwise(tmp_path):
    # The inner problems' LOs hold a log step scale per tensor; it survives a checkpoint:
    # stopped and resumed equals uninterrupted, bit for bit. The members update each other
    # without it (their outer state holds none).
    whole = Trainer(tiny(max_steps=4, step_adaptation=0.2), tmp_path / "whole").run()
    Trainer(tiny(max_steps=2, step_adaptation=0.2), tmp_path / "split").run()
    assert main(["train", "--resume", str(tmp_path / "split"), "--set", "max_steps=4",
                 "--quiet"]) == 0
    _, state, path = open_checkpoint(tmp_path / "split")
    a, b = load_file(whole["checkpoint"]), load_file(path)
    assert a.keys() == b.keys() and any("log_scales" in name for name in a)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    scales = [np.asarray(x) for inner in state.slot_inner
              for x in jax.tree.leaves(inner.opt_state.log_scales)]
    assert scales and all(np.all(np.abs(x) <= 5.0) for x in scales)
    assert state.outer_state.log_scales is None
    assert state.thetas["layers"][-1]["w"].shape[-1] == 3


def test_the_meta_loss_field_reaches_the_estimator_and_is_checked():
    assert build(tiny(meta_loss="final")).estimator.meta_loss == "final"
    assert build(tiny()).estimator.meta_loss == "mean"
    with pytest.raises(ConfigError, match="meta_loss"):
        make_config({"meta_loss": "last"})
    assert build(tiny(meta_split="test")).estimator.meta_split == "test"
    assert build(tiny()).estimator.meta_split == "train"
    with pytest.raises(ConfigError, match="meta_split"):
        make_config({"meta_split": "valid"})
    assert build(tiny(log_floor=1e-12)).estimator.log_floor == 1e-12
    with pytest.raises(ConfigError, match="log_floor"):
        make_config({"log_floor": 0})


def test_ctrl_c_stops_after_the_step_and_writes_a_checkpoint(tmp_path):
    def interrupt(info):
        if info["state"].step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    summary = Trainer(tiny(max_steps=50), tmp_path / "run", on_step=interrupt).run()
    assert summary["interrupted"] and summary["steps"] == 2
    assert (tmp_path / "run" / "checkpoints" / "step-00000002.safetensors").is_file()
    resumed = Trainer(tiny(max_steps=4), tmp_path / "run").run(resume=True)
    assert resumed["steps"] == 4 and not resumed["interrupted"]


def test_non_finite_member_is_replaced_at_once(tmp_path):
    trainer = Trainer(tiny(max_steps=1), tmp_path / "run")
    trainer.run_dir.mkdir()
    state = trainer.initial_state()
    state.thetas = jax.tree.map(lambda x: x.at[1].set(jnp.nan), state.thetas)
    trainer.one_step(state)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.thetas))
    (event,) = log_rows(tmp_path / "run", "lineage.jsonl")
    assert event["kind"] == "replace_non_finite" and event["position"] == 1
    assert state.member_ids[1] == event["child_id"] == 4 and event["parent_id"] != 1


def test_pbt_rounds_record_lineage_and_copy_weights(tmp_path):
    summary = Trainer(tiny(max_steps=4, resample_probability=0.0), tmp_path / "run").run()
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
    (["--set", "num_pairs=0"], "num_pairs"),
    (["--set", "families=[\"autoencoder\"]"], "families"),
    (["--set", "clip_relative=1"], "clip_relative"),
    (["--set", "clip=-1"], "clip"),
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
    Trainer(tiny(max_steps=3, checkpoint_seconds=0), tmp_path / "run").run()
    latest = tmp_path / "run" / "checkpoints" / "step-00000003.safetensors"
    damage(latest, how)
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet", "--max-steps", "5"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("selfopt: warning: skipping "
                                                   "step-00000003.safetensors"), err
    assert "resuming from step-00000002.safetensors" in err
    whole = Trainer(tiny(max_steps=5, checkpoint_seconds=0), tmp_path / "whole").run()
    a = load_file(whole["checkpoint"])
    b = load_file(tmp_path / "run" / "checkpoints" / "step-00000005.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for name in ("metrics.jsonl", "lineage.jsonl"):
        assert log_rows(tmp_path / "whole", name) == log_rows(tmp_path / "run", name)


@pytest.mark.parametrize("how", ["truncate", "flip_array"])
def test_resume_with_every_checkpoint_damaged_is_a_clear_error(tmp_path, capsys, how):
    Trainer(tiny(max_steps=3, checkpoint_seconds=0), tmp_path / "run").run()
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

    Trainer(tiny(max_steps=2), tmp_path / "run").run()
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    with open(tmp_path / "run" / ".lock") as held:  # a running trainer holds this lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "in use by another selfopt train" in err and err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before


def test_stratified_slots_hold_one_family_each():
    cfg = make_config({"families": ["quadratic", "test_function", "logistic"], "num_slots": 4,
                       "stratify_slots": True})
    trainer = Trainer(cfg, "unused")
    for step in (0, 40, 400, 4000):
        assert [trainer.slot_config(s, step)["family"] for s in range(4)] == [
            "quadratic", "test_function", "logistic", "quadratic"]
    mixed = Trainer(make_config({"families": ["quadratic", "test_function", "logistic"],
                                 "num_slots": 4}), "unused")
    draws = {mixed.slot_config(0, step)["family"] for step in range(0, 4000, 40)}
    assert len(draws) == 3  # unstratified: any slot draws any family


def test_held_in_pbt_score_ranks_members_on_every_family(tmp_path, monkeypatch):
    trainer = Trainer(tiny(max_steps=2, pbt_score="held_in",
                           families=["quadratic", "test_function"]), tmp_path / "run")
    calls = []
    original = trainer.held_in_meta_loss

    def spy(thetas, *args, **kwargs):
        calls.append((args, original(thetas, *args, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(trainer, "held_in_meta_loss", spy)
    trainer.run()
    pbt_calls = [(a, out) for a, out in calls if len(a) == 4]  # (steps, key, PBT seed, loss)
    assert len(pbt_calls) == 1 and pbt_calls[0][0][0] == 5
    scores = trainer.load_latest().scores
    copied = {e["position"] for e in map(json.loads, (tmp_path / "run" / "lineage.jsonl")
                                         .read_text().splitlines())}
    for i, value in enumerate(pbt_calls[0][1]):
        if i not in copied:  # an exploited member takes its parent's score
            assert scores[i] == pytest.approx(float(value))


def test_fused_steps_equal_one_step_at_a_time(tmp_path):
    """``outer_steps`` (one compiled scan) against the same steps one call each."""
    from selfopt.train import outer_step, outer_steps, step_key

    trainer = Trainer(tiny(), tmp_path / "run")
    state = trainer.initial_state()
    comps = trainer.comps
    task = trainer.task(state.slot_configs[0])
    args = (state.thetas, state.outer_state, state.slot_inner[0])
    one = args
    for step in range(5, 8):
        *one, metrics = outer_step(comps.estimator, comps.outer, *one[:2], state.hparams,
                                   jnp.asarray(0), one[2], task, step_key(0, step, 0))
    fused = outer_steps(comps.estimator, comps.outer, *args[:2], state.hparams, jnp.asarray(0),
                        args[2], task, 0, 5, 3)
    raw = lambda x: (jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                     else x)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(fused[:3])):
        np.testing.assert_allclose(np.asarray(raw(a), np.float64), np.asarray(raw(b), np.float64),
                                   rtol=1e-4, atol=1e-6)
    assert fused[3]["meta_loss"].shape == (3, 4)
    np.testing.assert_allclose(fused[3]["meta_loss"][-1], metrics["meta_loss"], rtol=1e-4)


def test_fused_run_logs_every_step_and_resumes_bitwise(tmp_path):
    whole = Trainer(tiny(max_steps=6, steps_per_call=3), tmp_path / "whole").run()
    Trainer(tiny(max_steps=3, steps_per_call=3), tmp_path / "split").run()
    resumed = Trainer(tiny(max_steps=6, steps_per_call=3), tmp_path / "split").run(resume=True)
    assert whole["steps"] == resumed["steps"] == 6
    a, b = load_file(whole["checkpoint"]), load_file(resumed["checkpoint"])
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    rows = log_rows(tmp_path / "whole", "metrics.jsonl")
    assert [r["step"] for r in rows] == [s for s in range(6) for _ in range(4)]
    assert rows == log_rows(tmp_path / "split", "metrics.jsonl")
    lineage = log_rows(tmp_path / "whole", "lineage.jsonl")
    assert {e["step"] for e in lineage if e["kind"] == "exploit"} == {3, 6}  # pbt_interval 2
