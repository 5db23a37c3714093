"""The elite: the best held-in validation of a run, kept, restored into a drifting population,
checkpointed, and evaluated as the run's answer."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfopt import checkpoint as ckpt
from selfopt.config import ConfigError
from selfopt.population import score_members
from selfopt.tasks import TaskDistribution, make_task
from selfopt.tasks.distribution import COMPACT_GRIDS, HELDOUT_SEED_START
from selfopt.train import Trainer, member_slice
from test_train import log_rows, tiny


def validation_rows(run_dir):
    return log_rows(run_dir, "validation.jsonl")


def wreck(thetas):
    """Members that step every weight by -1 each step (a last-layer direction bias of 1000):
    they diverge on any task, far worse than any trained or random optimizer."""
    thetas = jax.tree.map(jnp.array, thetas)
    thetas["layers"][-1]["b"] = thetas["layers"][-1]["b"].at[:, 0].set(1000.0)
    return thetas


def test_the_elite_is_the_best_validation_so_far_and_its_weights_are_kept(tmp_path):
    trainer = Trainer(tiny(max_steps=12, validate_interval=3, restore_elite=False),
                      tmp_path / "run")
    trainer.run()
    rows = validation_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 3, 6, 9, 12]
    best_so_far = np.minimum.accumulate([min(r["scores"]) for r in rows])
    np.testing.assert_allclose([r["elite_score"] for r in rows], best_so_far)
    state = trainer.load_latest()
    assert state.elite_score == rows[-1]["elite_score"] and state.elite_id == rows[-1]["elite_id"]
    # the stored weights are the elite's: revalidated alone, they score what they scored then
    one = jax.tree.map(lambda x: jnp.stack([x, x]), state.elite["theta"])
    cfg = trainer.cfg
    again = Trainer(tiny(population=2), tmp_path / "other").held_in_meta_loss(
        one, cfg.validate_steps, loss=cfg.score_loss)
    np.testing.assert_allclose(again, state.elite_score, rtol=1e-5)


def test_a_population_worse_than_the_elite_gets_it_back(tmp_path):
    trainer = Trainer(tiny(max_steps=1, validate_interval=1), tmp_path / "run")
    trainer.run()
    state = trainer.load_latest()
    # every member drifts into divergence: the next validation finds none as good as the elite
    state.thetas = wreck(state.thetas)
    scores = trainer.held_in_meta_loss(state.thetas, trainer.cfg.validate_steps,
                                       loss=trainer.cfg.score_loss)
    assert scores.min() > state.elite_score
    trainer.validate(state)
    worst = int(np.argmax(scores))
    assert validation_rows(tmp_path / "run")[-1]["restored"] == worst
    for a, b in zip(jax.tree.leaves(member_slice(state.thetas, worst)),
                    jax.tree.leaves(state.elite["theta"])):
        np.testing.assert_array_equal(a, b)
    event = log_rows(tmp_path / "run", "lineage.jsonl")[-1]
    assert event["kind"] == "restore_elite" and event["parent_id"] == state.elite_id
    assert trainer.replacement_counts()["restore_elite"] == 1


def test_without_restoring_the_population_is_left_alone(tmp_path):
    trainer = Trainer(tiny(max_steps=1, validate_interval=1, restore_elite=False),
                      tmp_path / "run")
    trainer.run()
    state = trainer.load_latest()
    state.thetas = wreck(state.thetas)
    before = jax.tree.map(np.asarray, state.thetas)
    trainer.validate(state)
    assert validation_rows(tmp_path / "run")[-1]["restored"] is None
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.thetas)):
        np.testing.assert_array_equal(a, b)


def test_the_elite_survives_a_checkpoint_exactly_and_is_what_evaluation_takes(tmp_path):
    trainer = Trainer(tiny(max_steps=4, validate_interval=2), tmp_path / "run")
    trainer.run()
    state = trainer.load_latest()
    path = trainer.save(state)
    loaded = trainer.load(path)
    for a, b in zip(jax.tree.leaves(state.elite), jax.tree.leaves(loaded.elite)):
        assert np.shape(a) == np.shape(b)  # scalars (the step count) stay scalars
        np.testing.assert_array_equal(a, b)
    candidate = trainer.member_candidate(loaded)
    assert "elite" in candidate.name
    assert trainer.member_source(loaded) == {"member": "elite", "member_id": loaded.elite_id,
                                             "elite_step": loaded.elite_step}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["elite"]["validation"] == state.elite_score
    assert {k: summary["elite"][k] for k in ("id", "step")} == {"id": state.elite_id,
                                                               "step": state.elite_step}
    # on the summary's own problems and measure, next to the population's start and end
    one = jax.tree.map(lambda x: x[None], state.elite["theta"])
    np.testing.assert_allclose(summary["elite"]["held_in"], trainer.held_in_meta_loss(one)[0],
                               rtol=1e-6)


def test_fresh_validation_rescores_the_elite_on_each_rounds_new_problems(tmp_path):
    trainer = Trainer(tiny(max_steps=4, validate_interval=2, validate_fresh=True),
                      tmp_path / "run")
    trainer.run()
    state = trainer.load_latest()
    # new problems each round, the same ones for the same step (a resumed run agrees)
    at_4, at_6 = trainer.validation_scores(state.thetas, 4), trainer.validation_scores(
        state.thetas, 6)
    assert not np.allclose(at_4, at_6)
    np.testing.assert_array_equal(at_4, trainer.validation_scores(state.thetas, 4))
    # the fixed problems' trainer ignores the step
    fixed = Trainer(tiny(max_steps=4, validate_interval=2), tmp_path / "fixed")
    np.testing.assert_array_equal(fixed.validation_scores(state.thetas, 4),
                                  fixed.validation_scores(state.thetas, 6))
    # a round: the elite scored on this round's problems, by the member score function alone
    state.step, old_elite = 6, jax.tree.map(np.asarray, state.elite["theta"])
    elite_alone = trainer.validation_scores(jax.tree.map(lambda x: x[None], old_elite), 6)[0]
    trainer.validate(state)
    row = validation_rows(tmp_path / "run")[-1]
    if min(at_6) < elite_alone:  # a member beat it on the same problems: the new elite
        assert row["restored"] is None
        assert state.elite_id == state.member_ids[int(np.argmin(at_6))]
        np.testing.assert_allclose(state.elite_score, min(at_6), rtol=1e-5)
    else:  # none did: it stays, with this round's score, and is restored into the population
        assert row["restored"] == int(np.argmax(at_6))
        np.testing.assert_allclose(state.elite_score, elite_alone, rtol=1e-5)
    np.testing.assert_allclose(row["scores"], at_6, rtol=1e-5)
    # the elite is re-scored even when it is far better than every member
    state.thetas, state.step = wreck(state.thetas), 8
    before = jax.tree.map(np.asarray, state.elite["theta"])
    expected = trainer.validation_scores(jax.tree.map(lambda x: x[None], before), 8)[0]
    trainer.validate(state)
    np.testing.assert_allclose(state.elite_score, expected, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.elite["theta"])):
        np.testing.assert_array_equal(a, b)
    assert validation_rows(tmp_path / "run")[-1]["restored"] is not None


def test_a_run_without_validation_has_no_elite_and_answers_with_its_best_member(tmp_path):
    trainer = Trainer(tiny(max_steps=2, validate_interval=0), tmp_path / "run")
    trainer.run()
    state = trainer.load_latest()
    assert state.elite is None and state.elite_id == -1
    assert ckpt.read_metadata(trainer.checkpoints()[-1])["run"]["elite_id"] == -1
    assert trainer.member_source(state)["member"] == state.best


def test_grid_validation_scores_distinct_grid_configurations_of_every_family(tmp_path):
    cfg = tiny(families=["quadratic", "test_function"], validate_problems="grid")
    trainer = Trainer(cfg, tmp_path / "run")
    distribution = trainer.comps.distribution
    configs = [c for f in cfg.families for c in distribution.distinct_configs(f, 2, 7)]
    assert [c["family"] for c in configs] == ["quadratic"] * 2 + ["test_function"] * 2
    for first, second in (configs[:2], configs[2:]):
        assert {**first, "seed": 0} != {**second, "seed": 0}  # not the same task twice
    for c in configs:
        assert c["seed"] < HELDOUT_SEED_START
        assert all(c[field] in values or tuple(c[field]) in values
                   for field, values in COMPACT_GRIDS[c["family"]].items())
    # the validation score is the mean of score_members on those configurations, one problem each
    thetas = trainer.initial_thetas()
    got = trainer.held_in_meta_loss(thetas, 6, seed=7, loss="final", problems="grid")
    key = jax.random.key(7)
    expected = np.mean([score_members(trainer.comps.lopt, thetas, make_task(c), key, 6,
                                      num_problems=1, loss="final") for c in configs], axis=0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert not np.allclose(got, trainer.held_in_meta_loss(thetas, 6, seed=7, loss="final"))


def test_full_grid_validation_scores_configurations_beyond_the_compact_grid(tmp_path):
    cfg = tiny(families=["quadratic"], validate_problems="full", reparam_scale=10)
    trainer = Trainer(cfg, tmp_path / "run")
    full = TaskDistribution(["quadratic"], "full")
    drawn = [full.distinct_configs("quadratic", 2, seed) for seed in range(20)]
    # sizes the compact grid never trains on, and no augmentation
    assert any(c["dim"] not in COMPACT_GRIDS["quadratic"]["dim"] for cs in drawn for c in cs)
    assert all("reparam_scale" not in c for cs in drawn for c in cs)
    thetas = trainer.initial_thetas()
    key = jax.random.key(7)
    expected = np.mean([score_members(trainer.comps.lopt, thetas, make_task(c), key, 6,
                                      num_problems=1, loss="final") for c in drawn[7]], axis=0)
    got = trainer.held_in_meta_loss(thetas, 6, seed=7, loss="final", problems="full")
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    with pytest.raises(ConfigError, match="validate_problems"):
        tiny(validate_problems="heldout")
