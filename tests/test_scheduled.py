"""The learned schedule (selfopt/lopt/scheduled.py): the MLP's step times exp of a piecewise
linear function of the fraction of training done, checked against NumPy's interpolation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfopt.config import make_config
from selfopt.lopt import MLPLOpt, ScheduledLOpt, check_theta

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros(4)}
GRADS = {"w": jnp.cos(jnp.arange(12.0)).reshape(3, 4), "b": jnp.sin(jnp.arange(4.0))}


def mlp_part(theta):
    return {k: v for k, v in theta.items() if k != "schedule"}


def updates(lopt, theta, num_steps, steps):
    opt = lopt.optimizer(theta, num_steps=num_steps)
    state, out = opt.init(PARAMS), []
    for _ in range(steps):
        u, state = opt.update(GRADS, state, PARAMS)
        out.append(u)
    return out


def test_a_fresh_schedule_takes_the_mlps_steps_and_fits_check_theta():
    lopt = ScheduledLOpt()
    theta = lopt.init(jax.random.key(0))
    check_theta(lopt, theta)
    np.testing.assert_array_equal(theta["schedule"], np.zeros(5))
    ours = updates(lopt, theta, 10, 3)
    mlp = updates(MLPLOpt(), mlp_part(theta), 10, 3)
    for a, b in zip(ours, mlp):
        np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)


@pytest.mark.parametrize("horizon", [None, 8])
def test_the_step_is_the_mlps_times_exp_of_the_interpolated_schedule(horizon):
    lopt = ScheduledLOpt(schedule_knots=4)
    knots = np.array([0.7, -0.2, -1.0, -3.0])
    theta = {**lopt.init(jax.random.key(1)), "schedule": jnp.asarray(knots, jnp.float32)}
    ours = updates(lopt, theta, horizon, 10)
    mlp = updates(MLPLOpt(), mlp_part(theta), horizon, 10)
    for t, (a, b) in enumerate(zip(ours, mlp), start=1):
        # past the horizon the fraction stays 1; an unknown horizon means no schedule
        expected = (np.exp(np.interp(min(t / horizon, 1.0), np.linspace(0, 1, 4), knots))
                    if horizon else 1.0)
        np.testing.assert_allclose(a["w"], expected * np.asarray(b["w"]), rtol=1e-5)


def test_the_kind_is_a_config_choice_with_its_field():
    cfg = make_config({"lopt.kind": "scheduled", "lopt.schedule_knots": 3})
    assert isinstance(cfg.lopt, ScheduledLOpt) and cfg.lopt.schedule_knots == 3
    with pytest.raises(ValueError, match="schedule_knots"):
        make_config({"lopt.kind": "scheduled", "lopt.schedule_knots": 1})
