"""The elite: the best held-in validation of a run, kept, restored into a drifting population,
checkpointed, and evaluated as the run's answer."""
import json

import jax
import jax.numpy as jnp
import numpy as np

from selfopt.population.elite import answer
from selfopt.population.state import member_slice
from selfopt.run_dir import RunDir, open_checkpoint
from selfopt.train import candidate, train
from selfopt.train_step import held_in_scores, initial_thetas, validate
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
    train(tiny(max_steps=12, validate_interval=3, restore_elite=False), tmp_path / "run")
    rows = validation_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 3, 6, 9, 12]
    best_so_far = np.minimum.accumulate([min(r["scores"]) for r in rows])
    np.testing.assert_allclose([r["elite_score"] for r in rows], best_so_far)
    _, state, _ = open_checkpoint(tmp_path / "run")
    assert state.elite.score == rows[-1]["elite_score"] and state.elite.id == rows[-1]["elite_id"]
    # the stored weights are the elite's: revalidated alone, they score what they scored then
    one = jax.tree.map(lambda x: jnp.stack([x, x]), state.elite.theta)
    np.testing.assert_allclose(held_in_scores(tiny(population=2), one), state.elite.score,
                               rtol=1e-5)


def test_a_population_worse_than_the_elite_gets_it_back(tmp_path):
    cfg = tiny(max_steps=1, validate_interval=1)
    train(cfg, tmp_path / "run")
    _, state, _ = open_checkpoint(tmp_path / "run")
    # every member drifts into divergence: the next validation finds none as good as the elite
    state = state.replace(thetas=wreck(state.thetas))
    scores = held_in_scores(cfg, state.thetas)
    assert scores.min() > state.elite.score
    after, (event,), row = validate(cfg, state)
    worst = int(np.argmax(scores))
    assert row["restored"] == worst and row["elite_id"] == state.elite.id
    for a, b in zip(jax.tree.leaves(member_slice(after.thetas, worst)),
                    jax.tree.leaves(state.elite.theta)):
        np.testing.assert_array_equal(a, b)
    assert event["kind"] == "restore_elite" and event["parent_id"] == state.elite.id
    assert after.lineage.ids[worst] == event["child_id"] == state.lineage.next_id
    before = dict(state.lineage.counts).get("restore_elite", 0)
    assert dict(after.lineage.counts)["restore_elite"] == before + 1
    assert after.elite is state.elite  # the elite itself is unchanged


def test_without_restoring_the_population_is_left_alone(tmp_path):
    cfg = tiny(max_steps=1, validate_interval=1, restore_elite=False)
    train(cfg, tmp_path / "run")
    _, state, _ = open_checkpoint(tmp_path / "run")
    state = state.replace(thetas=wreck(state.thetas))
    after, events, row = validate(cfg, state)
    assert row["restored"] is None and events == []
    for a, b in zip(jax.tree.leaves(state.thetas), jax.tree.leaves(after.thetas)):
        np.testing.assert_array_equal(a, b)


def test_the_elite_survives_a_checkpoint_exactly_and_is_what_evaluation_takes(tmp_path):
    cfg = tiny(max_steps=4, validate_interval=2)
    train(cfg, tmp_path / "run")
    _, state, _ = open_checkpoint(tmp_path / "run")
    run = RunDir(tmp_path / "run")
    loaded = run.load(cfg, run.save(cfg, state))
    assert (loaded.elite.score, loaded.elite.step, loaded.elite.id) == (
        state.elite.score, state.elite.step, state.elite.id)
    for a, b in zip(jax.tree.leaves(state.elite), jax.tree.leaves(loaded.elite)):
        assert np.shape(a) == np.shape(b)  # scalars (the step count) stay scalars
        np.testing.assert_array_equal(a, b)
    elite, source = candidate(cfg, loaded)
    assert "elite" in elite.name
    assert source == {"member": "elite", "member_id": loaded.elite.id,
                      "elite_step": loaded.elite.step}
    theta, member, _ = answer(loaded, 2)
    assert member == {"member": 2, "member_id": loaded.lineage.ids[2]}
    np.testing.assert_array_equal(jax.tree.leaves(theta)[0],
                                  jax.tree.leaves(loaded.thetas)[0][2])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["elite"]["validation"] == state.elite.score
    assert {k: summary["elite"][k] for k in ("id", "step")} == {"id": state.elite.id,
                                                               "step": state.elite.step}
    # on the summary's own problems and measure, next to the population's start and end
    one = jax.tree.map(lambda x: x[None], state.elite.theta)
    np.testing.assert_allclose(summary["elite"]["validation"], held_in_scores(cfg, one)[0],
                               rtol=1e-5)
    start = held_in_scores(cfg, initial_thetas(cfg))
    assert summary["held_in_start"] == {"median": float(np.median(start)),
                                        "best": float(start.min())}


def test_validation_and_pbt_scores_share_one_compiled_program_per_task_shape():
    from selfopt.population import elite, slots
    # quadratics of the compact grid, augmented (tasks.reparam_scale 10); an architecture no
    # other test compiles, so the count starts from nothing
    cfg = tiny(**{"lopt.hidden": [5]})
    training = next(c for c in (cfg.tasks.sample(s) for s in range(50)) if c["dim"] == 16)
    thetas = initial_thetas(cfg)
    before = elite.score._cache_size()
    held_in_scores(cfg, thetas)  # the held-in quadratic: dim 16, every scale 1
    elite.score(cfg.lopt, thetas, slots.task(training), jax.random.key(1), 7,
                loss=cfg.pbt.score_loss)  # a PBT round's score: another task, other steps
    assert elite.score._cache_size() - before == 1


def test_the_identity_augmentation_is_the_task_itself_exactly():
    from selfopt.population.elite import held_in_task
    from selfopt.tasks.augmentation import Reparametrized
    plain, wrapped = held_in_task("mlp", False), held_in_task("mlp", True)
    assert isinstance(wrapped, Reparametrized) and wrapped.task is plain
    key = jax.random.key(3)
    params, batch = plain.init(key), plain.sample_batch(key)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(wrapped.init(key))):
        np.testing.assert_array_equal(a, b)
    loss, grads = jax.value_and_grad(plain.loss)(params, batch)
    loss_w, grads_w = jax.value_and_grad(wrapped.loss)(params, batch)
    assert loss == loss_w
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_w)):
        np.testing.assert_array_equal(a, b)
