"""The tuned-Adam baseline and the comparison measures, against independent computations."""
import numpy as np
import optax
import pytest

from selfopt.evaluate import (ADAM_LEARNING_RATES, final_loss, run_training, seed_keys,
                              speedup_over, steps_to_reach, tune_adam, update_sizes)
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


def shipped_path(config):
    from selfopt.evaluate import SHIPPED_ADAM, _cache_path
    from selfopt.tasks.distribution import full_config
    return _cache_path(SHIPPED_ADAM, full_config(config), 300, 3, 0, ADAM_LEARNING_RATES)


def test_every_held_out_task_has_tuned_adam_shipped_at_the_default_budget():
    from selfopt.evaluate import suite
    missing = [c for c in suite("heldout") if not shipped_path(c).is_file()]
    assert not missing, f"run scripts/ship_tuned_adam.py: no shipped result for {missing}"


def test_shipped_tuned_adam_is_read_without_tuning_and_equals_a_fresh_tuning(tmp_path,
                                                                           monkeypatch):
    import selfopt.evaluate as evaluate
    config = evaluate.suite("quick")[0]  # the dimension-32 quadratic: seconds to tune
    fresh = tune_adam(config, 300, 3)  # no cache: computed here
    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "_adam_grid", lambda *a, **k: pytest.fail("tuned again"))
        shipped = tune_adam(config, 300, 3, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # read from the package, nothing written
    assert shipped.learning_rate == fresh.learning_rate
    np.testing.assert_allclose(shipped.train_losses, fresh.train_losses, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(shipped.valid_losses, fresh.valid_losses, rtol=1e-4, atol=1e-7)


def test_linear_decay_adam_is_optax_adam_with_a_linear_schedule_and_cached_apart(tmp_path):
    rates = (1e-2, 1e-1)
    decayed = tune_adam(QUAD, num_steps=40, num_seeds=2, learning_rates=rates,
                        cache_dir=tmp_path, linear_decay=True)
    task = make_task(QUAD)
    for lr in rates:
        runs = [run_training(task, optax.adam(optax.linear_schedule(lr, 0.0, 40)), k, 40)
                for k in seed_keys(QUAD, 2)]
        np.testing.assert_allclose(decayed.final_by_rate[lr],
                                   np.mean([final_loss(r.train_losses) for r in runs]), rtol=1e-4)
    constant = tune_adam(QUAD, num_steps=40, num_seeds=2, learning_rates=rates,
                         cache_dir=tmp_path)
    assert len(list(tmp_path.glob("adam-*.json"))) == 2  # one file each, neither overwritten
    assert decayed.final_by_rate != constant.final_by_rate


def test_steps_to_reach_and_speedup_on_known_curves():
    adam = np.linspace(1.0, 0.0, 101)[:100]  # loss 1 - t/100
    assert steps_to_reach(adam, 0.5) == pytest.approx(55.0)  # trailing mean of 10 steps
    assert steps_to_reach(adam, -1.0) == float("inf")
    fast = np.full(50, 0.3)  # reaches 0.3 in 50 steps; Adam's trailing mean gets there at 75
    assert speedup_over(adam, fast) == pytest.approx(75 / 50)
    slow = np.full(100, 0.9)
    assert speedup_over(adam, slow) == pytest.approx(15 / 100)
    assert final_loss(np.array([1.0, np.nan])) == float("inf")


# -- the comparison of an optimizer under test with tuned Adam ---------------------------------

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from selfopt.evaluate import (NORMALIZED_CAP, Candidate, Evaluation, TaskComparison,  # noqa: E402
                              compare_on_task, evaluate, lopt_candidate, optax_candidate, suite)
from selfopt.lopt import MLPLOpt  # noqa: E402
from selfopt.tasks import (TEST_HORIZON, TEST_SEED_START, TRAIN_GRIDS,  # noqa: E402
                           TaskDistribution)


def scaled_adam_curve(factor):
    """A candidate whose every training loss is ``factor`` x the initial loss (known answer)."""
    def runs(task, keys, num_steps):
        def one(key):
            params = task.init(jax.random.split(key, 3)[0])
            batch = task.sample_batch(jax.random.fold_in(jax.random.split(key, 3)[1], 0))
            init = task.loss(params, batch)
            return jnp.full(num_steps, factor * init), factor * init
        return jax.vmap(one)(keys)
    return Candidate(f"x{factor}", runs)


def test_normalised_loss_and_wins_on_synthetic_curves(tmp_path):
    half = compare_on_task(scaled_adam_curve(0.5), QUAD, num_steps=40, num_seeds=2,
                           cache_dir=tmp_path)
    assert half.normalized == pytest.approx(0.5, rel=1e-5)  # quadratic floor is 0
    assert half.final == pytest.approx(0.5 * half.init_loss, rel=1e-5)
    assert half.adam_normalized == pytest.approx(half.adam_final / half.init_loss, rel=1e-5)
    assert not half.wins  # Adam gets a quadratic well below half its initial loss in 40 steps
    assert half.speedup < 1
    blown = compare_on_task(scaled_adam_curve(float("nan")), QUAD, 40, 2, cache_dir=tmp_path)
    assert blown.normalized == NORMALIZED_CAP and not blown.wins and blown.speedup == 0.0


def _row(label, normalized, adam_normalized):
    return TaskComparison(label, {}, 10, 1.0, normalized, normalized, normalized, normalized,
                          adam_normalized, adam_normalized, adam_normalized, adam_normalized,
                          1e-3, 1.0)


def test_beating_adam_needs_a_lower_mean_and_a_majority_of_wins():
    ev = lambda rows: Evaluation("x", 10, 1, 0, tuple(rows))
    wins_most_but_loses_big = ev([_row("a", 0.1, 0.2), _row("b", 0.1, 0.2), _row("c", 5.0, 0.2)])
    assert wins_most_but_loses_big.num_wins == 2
    assert wins_most_but_loses_big.mean_normalized == pytest.approx(5.2 / 3)
    assert not wins_most_but_loses_big.beats_adam
    lower_mean_minority = ev([_row("a", 0.01, 1.0), _row("b", 0.3, 0.2), _row("c", 0.3, 0.2)])
    assert not lower_mean_minority.beats_adam
    both = ev([_row("a", 0.1, 0.2), _row("b", 0.1, 0.2), _row("c", 0.3, 0.2)])
    assert both.beats_adam
    summary = both.summary()
    assert summary["wins"] == 2 and summary["median_ratio"] == pytest.approx(0.5)
    assert summary["margin"] == pytest.approx(0.5 / 0.6)


def test_an_optax_optimizer_by_name_is_the_optax_optimizer(tmp_path):
    sgd = compare_on_task(optax_candidate("sgd:0.05"), QUAD, 30, 2, cache_dir=tmp_path)
    direct = np.mean([final_loss(run_training(make_task(QUAD), optax.sgd(0.05), k, 30).train_losses)
                      for k in seed_keys(QUAD, 2)])
    assert sgd.final == pytest.approx(direct, rel=1e-5)
    assert optax_candidate("adam").name == "optax.adam(lr=0.001)"
    for bad in ("nosuch:0.1", "chain", "sgd:fast", "sgd:-1", "__import__:1"):
        with pytest.raises(ValueError):
            optax_candidate(bad)


def test_evaluation_is_reproducible_and_the_seed_matters(tmp_path):
    lopt = MLPLOpt(hidden=(8,))
    candidate = lopt_candidate(lopt, lopt.init(jax.random.key(3)))
    configs = [QUAD, {"family": "test_function", "seed": 2}]
    first = evaluate(candidate, configs, 20, 2, cache_dir=tmp_path)
    again = evaluate(lopt_candidate(lopt, lopt.init(jax.random.key(3))), configs, 20, 2,
                     cache_dir=tmp_path)
    assert [dataclasses.astuple(t) for t in first.tasks] == [dataclasses.astuple(t)
                                                             for t in again.tasks]
    other = evaluate(candidate, configs, 20, 2, seed=1, cache_dir=tmp_path)
    assert other.tasks[0].init_loss != first.tasks[0].init_loss


def test_suites_are_the_held_out_configurations():
    heldout, quick = suite("heldout"), suite("quick")
    assert heldout == TaskDistribution().heldout() and len(heldout) == 12
    assert {c["family"] for c in quick} == {"quadratic", "test_function", "logistic", "mlp",
                                            "autoencoder"}
    assert all(c in heldout for c in quick)
    with pytest.raises(ValueError, match="unknown task suite"):
        suite("train")


def test_the_test_suite_is_disjoint_from_validation_and_training():
    test, heldout = suite("test"), suite("heldout")
    strip = lambda c: {k: v for k, v in c.items() if k not in ("seed", "steps")}
    # every held-out task again, with a new seed, then new tasks of their own horizon
    assert [strip(c) for c in test[:12]] == [strip(c) for c in heldout]
    assert all(c["seed"] >= TEST_SEED_START and "steps" not in c for c in test[:12])
    new = test[12:]
    assert len(new) >= 4 and all(c["steps"] == TEST_HORIZON for c in new)
    assert not {c["seed"] for c in test} & {c["seed"] for c in heldout}
    for config in new:
        assert strip(config) not in [strip(c) for c in heldout]
        make_task({k: v for k, v in config.items() if k != "steps"})  # every task builds
        grid = TRAIN_GRIDS.get(config["family"], {})
        # a field value no training grid draws, or a family the default distribution never does
        assert (config["family"] not in TaskDistribution().families
                or any(config[k] not in [list(v) if isinstance(v, tuple) else v for v in values]
                       for k, values in grid.items() if k in config))


def test_a_task_may_carry_its_own_horizon(tmp_path):
    adam = optax_candidate("adam:0.01")
    row = compare_on_task(adam, {**QUAD, "steps": 12}, 40, 2, cache_dir=tmp_path)
    assert row.steps == 12 and row.label.endswith("@12 steps") and "steps" not in row.config
    assert compare_on_task(adam, QUAD, 12, 2, cache_dir=tmp_path).final == row.final
    with pytest.raises(ValueError, match="steps of a task must be a positive int"):
        compare_on_task(adam, {**QUAD, "steps": 0}, 40, 2, cache_dir=tmp_path)



def test_update_sizes_are_the_rms_of_each_step_of_the_same_run():
    # plain SGD on a noise-free quadratic: step t moves the parameters by lr * grad(params_t),
    # recomputed here with jax.grad from the run's own initial parameters
    task, key, lr, steps = make_task(QUAD), jax.random.key(3), 0.1, 6
    sizes = np.asarray(update_sizes(task, optax.sgd(lr), key, steps))
    losses = run_training(task, optax.sgd(lr), key, steps).train_losses
    params = task.init(jax.random.split(key, 3)[0])  # run_training's initial-parameter key
    batch = task.sample_batch(key, "test")  # no noise: every batch is this one
    for t in range(steps):
        loss, grad = jax.value_and_grad(task.loss)(params, batch)
        assert losses[t] == pytest.approx(float(loss), rel=1e-5)
        assert sizes[t] == pytest.approx(float(jnp.sqrt(jnp.mean((lr * grad) ** 2))), rel=1e-5)
        params = params - lr * grad
