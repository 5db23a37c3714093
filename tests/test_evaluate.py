"""The tuned-Adam baseline and the comparison measures, against independent computations."""
import numpy as np
import optax
import pytest

from selfopt.evaluate import (ADAM_LEARNING_RATES, final_loss, run_training, seed_keys,
                              speedup_over, steps_to_reach, tune_adam)
from selfopt.tasks import make_task

QUAD = {"family": "quadratic", "seed": 5, "dim": 8, "log_condition": 1.0, "noise": 0.0}


def test_adam_grid_has_14_log_spaced_rates_from_1e4_to_1():
    assert len(ADAM_LEARNING_RATES) == 14
    np.testing.assert_allclose(ADAM_LEARNING_RATES[0], 1e-4)
    np.testing.assert_allclose(ADAM_LEARNING_RATES[-1], 1.0)
    np.testing.assert_allclose(np.diff(np.log(ADAM_LEARNING_RATES)), np.log(10) * 4 / 13)


def test_tuned_adam_picks_the_rate_with_the_lowest_final_loss(tmp_path):
    rates = (1e-3, 1e-2, 1e-1, 1.0)
    tuned = tune_adam(QUAD, num_steps=60, num_seeds=2, learning_rates=rates)
    # Independent check: optax.adam itself, one run per rate and seed, through run_training.
    task = make_task(QUAD)
    finals = {lr: np.mean([final_loss(run_training(task, optax.adam(lr), k, 60).train_losses)
                           for k in seed_keys(QUAD, 2)]) for lr in rates}
    assert tuned.learning_rate == min(finals, key=finals.get)
    assert len({round(float(np.log10(v)), 1) for v in finals.values()}) > 2  # rates differ
    for lr in rates:
        np.testing.assert_allclose(tuned.final_by_rate[lr], finals[lr], rtol=1e-4)
    assert tuned.train_losses.shape == (2, 60) and tuned.valid_losses.shape == (2,)


def test_tuned_adam_is_cached_and_reproducible(tmp_path, monkeypatch):
    first = tune_adam(QUAD, num_steps=30, num_seeds=2, learning_rates=(1e-2, 1e-1),
                      cache_dir=tmp_path)
    assert len(list(tmp_path.glob("adam-*.json"))) == 1
    import selfopt.evaluate as evaluate

    monkeypatch.setattr(evaluate, "_adam_grid", lambda *a, **k: pytest.fail("not cached"))
    second = tune_adam(QUAD, num_steps=30, num_seeds=2, learning_rates=(1e-2, 1e-1),
                       cache_dir=tmp_path)
    assert second.learning_rate == first.learning_rate
    np.testing.assert_array_equal(second.train_losses, first.train_losses)
    np.testing.assert_array_equal(second.valid_losses, first.valid_losses)


def test_steps_to_reach_and_speedup_on_known_curves():
    adam = np.linspace(1.0, 0.0, 101)[:100]  # loss 1 - t/100
    assert steps_to_reach(adam, 0.5) == pytest.approx(55.0)  # trailing mean of 10 steps
    assert steps_to_reach(adam, -1.0) == float("inf")
    fast = np.full(50, 0.3)  # reaches 0.3 in 50 steps; Adam's trailing mean gets there at 75
    assert speedup_over(adam, fast) == pytest.approx(75 / 50)
    slow = np.full(100, 0.9)
    assert speedup_over(adam, slow) == pytest.approx(15 / 100)
    assert final_loss(np.array([1.0, np.nan])) == float("inf")
