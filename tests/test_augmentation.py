"""Task augmentation (``reparam_scale``): the same problem in a rescaled parametrisation, so
the step size that suits each tensor changes, without new task shapes."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfopt.config import ConfigError, make_config
from selfopt.tasks import Reparametrized, TaskDistribution, full_config, make_task

MLP = {"family": "mlp", "seed": 3, "hidden": [32, 16]}


def scales(task):
    return [float(jnp.exp(x)) for x in jax.tree_util.tree_leaves(task.log_scales)]


def test_the_wrapped_problem_is_the_same_problem_with_gradients_scaled_per_tensor():
    plain, wrapped = make_task(MLP), make_task({**MLP, "reparam_scale": 10})
    assert isinstance(wrapped, Reparametrized) and wrapped.family == "mlp"
    key = jax.random.key(1)
    params, phi, batch = plain.init(key), wrapped.init(key), plain.sample_batch(key)
    np.testing.assert_array_equal(wrapped.sample_batch(key)[0], batch[0])
    # the same starting point, so the same initial loss
    np.testing.assert_allclose(wrapped.loss(phi, batch), plain.loss(params, batch), rtol=1e-6)
    # chain rule: d loss / d phi = s * d loss / d params, tensor by tensor
    grad_p, grad_phi = jax.grad(plain.loss)(params, batch), jax.grad(wrapped.loss)(phi, batch)
    for gp, gphi, s in zip(jax.tree_util.tree_leaves(grad_p), jax.tree_util.tree_leaves(grad_phi),
                           scales(wrapped)):
        np.testing.assert_allclose(gphi, s * gp, rtol=1e-4, atol=1e-7)
    assert wrapped.normalize(0.5, 2.0) == plain.normalize(0.5, 2.0)


def test_adams_best_learning_rate_moves_by_the_inverse_scale():
    # A one-tensor task scaled by s: Adam at rate lr / s on the wrapped task follows Adam at lr
    # on the original exactly (in the original's coordinates), so the rate that suits the
    # task is different on every draw of the scale.
    config = {"family": "quadratic", "seed": 5, "dim": 16, "log_condition": 2.0, "noise": 0.0}
    plain, wrapped = make_task(config), make_task({**config, "reparam_scale": 30})
    (s,) = scales(wrapped)
    assert s != pytest.approx(1, abs=0.05)
    key = jax.random.key(0)

    def trajectory(task, learning_rate, to_params):
        opt = optax.adam(learning_rate, eps=0.0)
        params = task.init(key)
        state, out = opt.init(params), []
        for i in range(30):
            grads = jax.grad(task.loss)(params, task.sample_batch(jax.random.key(i)))
            updates, state = opt.update(grads, state)
            params = optax.apply_updates(params, updates)
            out.append(to_params(params))
        return np.stack(out)

    original = trajectory(plain, 0.1, lambda p: p)
    np.testing.assert_allclose(trajectory(wrapped, 0.1 / s, wrapped.scale), original,
                               rtol=1e-4, atol=1e-6)
    assert not np.allclose(trajectory(wrapped, 0.1, wrapped.scale), original, atol=1e-3)


def test_scales_are_per_tensor_log_uniform_reproducible_and_add_no_shapes():
    tasks = [make_task({**MLP, "seed": seed, "reparam_scale": 10}) for seed in range(200)]
    drawn = np.array([scales(t) for t in tasks])                    # (200, 6 tensors)
    assert drawn.shape == (200, 6)
    assert drawn.min() >= 0.1 and drawn.max() <= 10
    logs = np.log10(drawn).ravel()
    assert abs(logs.mean()) < 0.05 and 0.5 < logs.std() < 0.65     # uniform(-1, 1): std 0.577
    assert len(set(np.round(drawn[0], 6))) == 6                     # one scale per tensor
    assert scales(make_task({**MLP, "reparam_scale": 10})) == scales(tasks[3])
    assert len({t.shape_key for t in tasks}) == 1                   # scales are leaves
    # 1 is no augmentation; a configuration without the field is unchanged
    assert not isinstance(make_task({**MLP, "reparam_scale": 1}), Reparametrized)
    assert "reparam_scale" not in full_config(MLP)
    assert full_config({**MLP, "reparam_scale": 4}) == json.loads(
        json.dumps(full_config({**MLP, "reparam_scale": 4})))


def test_the_distribution_augments_training_tasks_only():
    distribution = TaskDistribution(("quadratic", "mlp"), "compact", reparam_scale=10)
    samples = [distribution.sample(seed) for seed in range(50)]
    assert all(c["reparam_scale"] == 10 for c in samples)
    assert all(isinstance(make_task(c), Reparametrized) for c in samples[:5])
    assert all("reparam_scale" not in c for c in distribution.heldout())
    plain = TaskDistribution(("quadratic", "mlp"), "compact", reparam_scale=1)
    # the same draws otherwise: augmentation changes no other field
    assert [{**c, "reparam_scale": None} for c in samples] == [
        {**plain.sample(seed), "reparam_scale": None} for seed in range(50)]
    assert all("reparam_scale" not in plain.sample(seed) for seed in range(50))


@pytest.mark.parametrize("bad", [0.5, 0, -2, "10", True, float("nan"), float("inf")])
def test_bad_scales_fail_in_one_line(bad):
    with pytest.raises(ValueError, match="reparam_scale must be a finite number >= 1") as err:
        make_task({**MLP, "reparam_scale": bad})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="reparam_scale"):
        TaskDistribution(reparam_scale=bad)


def test_the_config_field_reaches_the_distribution_and_is_checked():
    assert make_config({"tasks.reparam_scale": 10}).tasks.reparam_scale == 10
    assert make_config().tasks.reparam_scale == 10
    assert make_config({"tasks.reparam_scale": 1}).tasks.reparam_scale == 1
    for bad in (0.5, "x", float("nan")):
        with pytest.raises(ConfigError, match="tasks.reparam_scale"):
            make_config({"tasks.reparam_scale": bad})


def test_an_augmented_run_trains_on_reparametrized_tasks_and_resumes(tmp_path):
    from selfopt.cli import main
    from selfopt.population import slots
    from selfopt.run_dir import open_checkpoint
    from selfopt.train import train
    cfg = make_config({"population": 4, "estimator.num_pairs": 1,
                       "estimator.truncation_length": 5, "estimator.min_inner_length": 10,
                       "estimator.max_inner_length": 30,
                       "tasks.families": ["quadratic", "test_function"], "num_slots": 2,
                       "task_steps": 3, "pbt.interval": 2, "pbt.score_steps": 5,
                       "validate_steps": 5, "lopt.hidden": [8],
                       "eval_minutes": 0, "max_steps": 3, "tasks.reparam_scale": 10})
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    assert main(["train", "--resume", str(run_dir), "--set", "max_steps=4", "--quiet"]) == 0
    _, state, _ = open_checkpoint(run_dir)
    assert state.step == 4
    assert all(c["reparam_scale"] == 10 for c in state.slot_configs)
    assert all(isinstance(slots.task(c), Reparametrized) for c in state.slot_configs)
    assert np.all(np.isfinite(np.asarray(jax.tree_util.tree_leaves(state.thetas)[0])))
