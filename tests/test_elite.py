"""The elite: the best held-in validation of a run, kept, restored into a drifting population,
checkpointed, and evaluated as the run's answer."""
import json

import jax
import jax.numpy as jnp
import numpy as np

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
    again = Trainer(tiny(population=2), tmp_path / "other").held_in_meta_loss(one)
    np.testing.assert_allclose(again, state.elite_score, rtol=1e-5)


def test_a_population_worse_than_the_elite_gets_it_back(tmp_path):
    trainer = Trainer(tiny(max_steps=1, validate_interval=1), tmp_path / "run")
    trainer.run()
    state = trainer.load_latest()
    # every member drifts into divergence: the next validation finds none as good as the elite
    state.thetas = wreck(state.thetas)
    scores = trainer.held_in_meta_loss(state.thetas)
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
    np.testing.assert_allclose(summary["elite"]["validation"],
                               trainer.held_in_meta_loss(one)[0], rtol=1e-5)
    start = trainer.held_in_meta_loss(trainer.initial_thetas())
    assert summary["held_in_start"] == {"median": float(np.median(start)),
                                        "best": float(start.min())}
