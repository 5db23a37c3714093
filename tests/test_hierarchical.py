"""The hierarchical learned optimizer: the MLP's step times a per-tensor GRU's step size, its
cell and loss features against numpy, the horizon, optax use and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfopt.config import ConfigError, make_config
from selfopt.evaluate import train_losses
from selfopt.lopt import HierarchicalLOpt, MLPLOpt, as_optax
from selfopt.tasks import make_task
from tests.test_lopt import PARAMS, grads_like

LOPT = HierarchicalLOpt()


def theta_of(seed=0):
    return LOPT.init(jax.random.key(seed))


def run(opt, losses, params=PARAMS, seed=0):
    """Updates of ``opt`` over a sequence of losses (fixed random gradients)."""
    state, out = opt.init(params), []
    for t, loss in enumerate(losses):
        updates, state = opt.update(grads_like(params, seed + t), state, params, loss=loss)
        out.append(updates)
    return out, state


def test_a_fresh_optimizer_takes_the_mlps_steps():
    """The zero step head makes exp(s_T) = 1: the same updates as the MLP with those weights."""
    theta = theta_of()
    mlp = MLPLOpt()
    ours, _ = run(LOPT.optimizer(theta), [3.0, 2.0, 2.5])
    theirs, state = [], mlp.optimizer({"layers": theta["layers"]}).init(PARAMS)
    for t in range(3):
        updates, state = mlp.optimizer({"layers": theta["layers"]}).update(
            grads_like(PARAMS, t), state, PARAMS)
        theirs.append(updates)
    for a, b in zip(ours, theirs):
        for name in PARAMS:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-6)


def test_the_head_sets_every_tensors_log_step():
    theta = theta_of()
    halved = {**theta, "head": {"w": theta["head"]["w"], "b": jnp.log(jnp.float32(0.5))}}
    base, _ = run(LOPT.optimizer(theta), [1.0, 0.5])
    half, _ = run(LOPT.optimizer(halved), [1.0, 0.5])
    for a, b in zip(base, half):
        for name in PARAMS:
            np.testing.assert_allclose(b[name], 0.5 * a[name], rtol=1e-5)


def numpy_gru(theta, hidden, x):
    """A GRU step written out in numpy (gates: update, reset, candidate)."""
    c = {k: np.asarray(v, np.float64) for k, v in theta["cell"].items()}
    h = hidden.shape[1]
    sig = lambda a: 1 / (1 + np.exp(-a))
    wx, wh, b = c["wx"], c["wh"], c["b"]
    z = sig(x @ wx[:, :h] + hidden @ wh[:, :h] + b[:h])
    r = sig(x @ wx[:, h:2 * h] + hidden @ wh[:, h:2 * h] + b[h:2 * h])
    n = np.tanh(x @ wx[:, 2 * h:] + b[2 * h:] + r * (hidden @ wh[:, 2 * h:]))
    return (1 - z) * hidden + z * n


def test_the_cell_is_a_gru():
    theta = theta_of(1)
    theta["cell"]["b"] = jax.random.normal(jax.random.key(2), theta["cell"]["b"].shape)
    rng = np.random.default_rng(0)
    hidden = rng.uniform(-1, 1, (3, LOPT.cell_size))
    x = rng.normal(size=(3, LOPT.num_cell_features))
    got = LOPT.cell(theta, jnp.asarray(hidden, jnp.float32), jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, numpy_gru(theta, hidden, x), rtol=1e-4, atol=1e-5)


def test_loss_features_are_bias_corrected_z_scores_of_the_loss():
    losses = [5.0, 4.0, 4.5, 2.0, 1.0, 1.2, 30.0]
    _, state = run(LOPT.optimizer(theta_of()), losses[:-1])
    shared, _, _ = LOPT.loss_features(state, jnp.float32(losses[-1]), state.step + 1)
    for k, decay in enumerate(LOPT.loss_decays):
        mean = var = 0.0
        for loss in losses:
            mean = decay * mean + (1 - decay) * loss
            var = decay * var + (1 - decay) * (loss - mean) ** 2
        correction = 1 / (1 - decay ** len(losses))
        z = (losses[-1] - mean * correction) / np.sqrt(var * correction)
        np.testing.assert_allclose(shared[k], np.clip(z, -5, 5), rtol=1e-4)
    assert shared[0] > 1  # a jump of the loss reads as far above its mean


def test_a_non_finite_loss_reads_as_a_jump_and_leaves_the_statistics():
    _, state = run(LOPT.optimizer(theta_of()), [3.0, 2.0])
    shared, mean, var = LOPT.loss_features(state, jnp.float32(jnp.nan), state.step + 1)
    assert np.all(np.asarray(shared[:len(LOPT.loss_decays)]) == 5.0)
    np.testing.assert_array_equal(mean, state.loss_mean)
    np.testing.assert_array_equal(var, state.loss_var)


@pytest.mark.parametrize("num_steps, expected", [(8, (0.5, 1.0)), (None, (0.0, 0.0))])
def test_the_fraction_of_training_done_needs_the_horizon(num_steps, expected):
    _, state = run(LOPT.optimizer(theta_of(), num_steps), [1.0, 1.0, 1.0])
    shared, _, _ = LOPT.loss_features(state, jnp.float32(1.0), state.step + 1)
    n = len(LOPT.loss_decays)
    np.testing.assert_allclose(shared[n:n + 2], expected)
    np.testing.assert_allclose(shared[n + 2], np.log1p(4) / 10, rtol=1e-6)


def test_the_loss_reaches_the_step():
    """Weights that make the log step ``tanh(-z)``, ``z`` the fast loss z-score: a step after a
    rising loss is shorter than after a falling one, by exactly that much."""
    theta = jax.tree.map(jnp.zeros_like, theta_of())
    h, z_index = LOPT.cell_size, 7  # the first loss feature follows the 7 tensor features
    theta["cell"]["b"] = theta["cell"]["b"].at[:h].set(30.0)  # update gate open: h = candidate
    theta["cell"]["wx"] = theta["cell"]["wx"].at[z_index, 2 * h].set(-1.0)
    theta["head"]["w"] = theta["head"]["w"].at[0].set(1.0)
    theta["layers"] = theta_of()["layers"]
    opt = LOPT.optimizer(theta)
    falling, _ = run(opt, [4.0, 3.0, 2.0, 1.0])
    rising, _ = run(opt, [4.0, 3.0, 2.0, 8.0])
    _, before = run(opt, [4.0, 3.0, 2.0])
    z = [float(LOPT.loss_features(before, jnp.float32(loss), before.step + 1)[0][0])
         for loss in (1.0, 8.0)]
    assert z[0] < 0 < z[1]
    ratio = np.asarray(rising[-1]["dense"]) / np.asarray(falling[-1]["dense"])
    np.testing.assert_allclose(ratio, np.exp(np.tanh(-z[1]) - np.tanh(-z[0])), rtol=1e-4)
    assert ratio.flat[0] < 0.5


def test_it_trains_a_task_through_the_evaluation_loop():
    task = make_task({"family": "logistic"})
    losses = train_losses(task, as_optax(LOPT, theta_of(), num_steps=50), jax.random.key(0), 50)
    assert losses.shape == (50,) and np.all(np.isfinite(losses))


def test_update_without_the_loss_is_a_clear_error():
    opt = LOPT.optimizer(theta_of())
    with pytest.raises(ValueError, match="needs loss="):
        opt.update(grads_like(PARAMS), opt.init(PARAMS), PARAMS)


def test_it_is_an_optax_optimizer_in_a_chain():
    opt = optax.chain(optax.clip_by_global_norm(1.0), as_optax(LOPT, theta_of()))
    state = opt.init(PARAMS)
    updates, _ = opt.update(grads_like(PARAMS), state, PARAMS, loss=jnp.float32(1.0))
    assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)


def test_the_config_picks_it_by_kind():
    cfg = make_config({"lopt.kind": "hierarchical", "lopt.cell_size": 4})
    assert isinstance(cfg.lopt, HierarchicalLOpt) and cfg.lopt.cell_size == 4
    assert cfg.lopt.hidden == MLPLOpt().hidden  # the MLP's fields keep their defaults
    with pytest.raises(ConfigError, match="lopt.cell_size"):
        make_config({"lopt.kind": "hierarchical", "lopt.cell_size": 0})
    with pytest.raises(ConfigError, match="belongs to lopt.kind=hierarchical"):
        make_config({"lopt.cell_size": 4})
    with pytest.raises(ConfigError, match="lopt.decays"):
        make_config({"lopt.kind": "hierarchical", "lopt.decays": [0.5, 0.999]})
