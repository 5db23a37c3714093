"""The MLP learned optimizer: its update by value, any pytree, optax compatibility, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfopt.evaluate import train_losses
from selfopt.lopt import LearnedSGD, MLPLOpt, as_optax
from selfopt.tasks import FAMILIES, make_task

PARAMS = {
    "scale": jnp.asarray(0.5),
    "dense": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
    "conv": jnp.linspace(-2.0, 2.0, 72).reshape(3, 3, 2, 4),
}
#: The default depth rule's step factor for ``PARAMS``: two weight tensors (dense, conv) scale
#: every step by ``2 ** -1.5`` (its tensors are too narrow for the width rule).
PARAMS_DEPTH_FACTOR = 2.0 ** -1.5


def sgd_like_theta(lopt: MLPLOpt, scale: float = 1.0):
    """Weights that make the LO step ``-step_mult * scale * g / rms(g)`` per tensor.

    Two hidden ReLU units carry +g and -g (the first feature, the normalised gradient) through
    both layers; the direction output is their difference and the magnitude output is 0.
    """
    theta = jax.tree.map(jnp.zeros_like, lopt.init(jax.random.key(0)))
    layers = theta["layers"]
    layers[0]["w"] = layers[0]["w"].at[0, 0].set(1.0).at[0, 1].set(-1.0)
    for layer in layers[1:-1]:
        layer["w"] = layer["w"].at[0, 0].set(1.0).at[1, 1].set(1.0)
    layers[-1]["w"] = layers[-1]["w"].at[0, 0].set(scale).at[1, 0].set(-scale)
    return theta


def grads_like(params, seed=0):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, jnp.shape(x)) for k, x in zip(keys, leaves)])


def test_sgd_like_theta_gives_normalised_gradient_step_on_mixed_pytree():
    lopt = MLPLOpt()
    opt = as_optax(lopt, sgd_like_theta(lopt, scale=2.0))
    grads = grads_like(PARAMS)
    updates, _ = opt.update(grads, opt.init(PARAMS), PARAMS)
    for name, g in grads.items():
        rms = np.sqrt(np.mean(np.square(g)) + 1e-8)
        expected = -lopt.step_mult * 2.0 * PARAMS_DEPTH_FACTOR * np.clip(np.asarray(g) / rms,
                                                                        -5, 5)
        assert updates[name].shape == PARAMS[name].shape
        np.testing.assert_allclose(updates[name], expected, rtol=1e-5, atol=1e-9)


def test_zero_theta_emits_zero_steps():
    lopt = MLPLOpt()
    opt = lopt.optimizer(jax.tree.map(jnp.zeros_like, lopt.init(jax.random.key(0))))
    updates, _ = opt.update(grads_like(PARAMS), opt.init(PARAMS), PARAMS)
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))


def test_accumulators_follow_their_definitions():
    lopt = MLPLOpt()
    opt = lopt.optimizer(lopt.init(jax.random.key(0)))
    state = opt.init(PARAMS)
    g1, g2 = grads_like(PARAMS, 1), grads_like(PARAMS, 2)
    _, state = opt.update(g1, state, PARAMS)
    _, state = opt.update(g2, state, PARAMS)
    b = np.asarray(lopt.decays)
    g1d, g2d = np.asarray(g1["dense"])[..., None], np.asarray(g2["dense"])[..., None]
    expected_m = (1 - b) * b * g1d + (1 - b) * g2d
    np.testing.assert_allclose(state.momenta["dense"], expected_m, rtol=1e-5, atol=1e-7)
    bv = lopt.rms_decay
    expected_v = (1 - bv) * bv * np.square(g1["dense"]) + (1 - bv) * np.square(g2["dense"])
    np.testing.assert_allclose(state.rms["dense"], expected_v, rtol=1e-5, atol=1e-9)
    assert int(state.step) == 2


def test_features_are_normalised_clipped_and_sized():
    lopt = MLPLOpt()
    n = 50
    g = jnp.linspace(-1e-3, 1e-3, n).at[0].set(1.0)  # one huge outlier gets clipped
    feats = lopt.features(g, g * 100, jnp.stack([g] * 5, axis=1), g**2, jnp.asarray(7))
    assert feats.shape == (n, lopt.num_features) == (n, 27)
    assert MLPLOpt(raw_adam_features=False).num_features == 22
    assert float(jnp.max(jnp.abs(feats))) <= 5.0
    np.testing.assert_allclose(feats[:, -6:], np.broadcast_to(np.tanh(7 / np.array(lopt.timescales)), (n, 6)), rtol=1e-6)


def test_raw_adam_features_keep_the_tensor_wide_ratio_that_normalisation_erases():
    # A tensor whose gradient has cancelled out (momenta small against sqrt(v)) and one whose
    # gradient is consistent: the normalised Adam-like features (RMS 1 over the tensor) cannot
    # tell them apart; the raw ones are m / sqrt(v), computed here by hand.
    lopt = MLPLOpt()
    n, k = 40, len(lopt.decays)
    signs = jnp.where(jnp.arange(n) % 2 == 0, 1.0, -1.0)
    v = jnp.full(n, 4.0)
    step = jnp.asarray(3)
    cols = slice(lopt.num_features - len(lopt.timescales) - k, -len(lopt.timescales))
    norm = slice(3 + k, 3 + 2 * k)  # the normalised Adam-like block: after g, p, momenta, rms
    out = {}
    for name, scale in (("cancelled", 0.02), ("consistent", 1.9)):
        m = jnp.stack([signs * scale] * k, axis=1)
        out[name] = lopt.features(signs * scale, signs, m, v, step)
        np.testing.assert_allclose(out[name][:, cols], np.asarray(m) / np.sqrt(4.0 + 1e-8),
                                   rtol=1e-5)
    np.testing.assert_allclose(out["cancelled"][:, norm], out["consistent"][:, norm], rtol=1e-4)
    assert not np.allclose(out["cancelled"][:, cols], out["consistent"][:, cols])
    # both kinds are invariant to the gradient's scale: g, m and sqrt(v) scaled by 1000
    m = jnp.stack([signs * 0.5] * k, axis=1)
    a = lopt.features(signs * 0.5, signs, m, v, step)
    b = lopt.features(signs * 500.0, signs, m * 1000, v * 1e6, step)
    np.testing.assert_allclose(a[:, cols], b[:, cols], rtol=1e-5)
    np.testing.assert_allclose(a[:, norm], b[:, norm], rtol=1e-5)


def test_without_magnitude_features_the_step_ignores_the_gradient_scale():
    # The log-magnitudes are the only features that see absolute scale: without them, a
    # gradient 1000x larger gives the same features and so the same step; with them it does not.
    # (Scales well above the normalisation's epsilon: the 0.9999 momentum starts at 1e-4 g.)
    theta_on, theta_off = (MLPLOpt(magnitude_features=flag).init(jax.random.key(5))
                           for flag in (True, False))
    steps = {}
    for flag, theta in ((True, theta_on), (False, theta_off)):
        opt = MLPLOpt(magnitude_features=flag).optimizer(theta)
        grads = grads_like(PARAMS)
        for scale in (1e3, 1e6):
            scaled = jax.tree.map(lambda g: g * scale, grads)
            steps[flag, scale] = opt.update(scaled, opt.init(PARAMS), PARAMS)[0]["dense"]
    assert MLPLOpt(magnitude_features=False).num_features == MLPLOpt().num_features - 3
    np.testing.assert_allclose(steps[False, 1e3], steps[False, 1e6], rtol=1e-4, atol=1e-9)
    assert not np.allclose(steps[True, 1e3], steps[True, 1e6], rtol=1e-3)


def test_a_small_eps_keeps_the_features_scale_free_for_tiny_gradients():
    # Gradients of RMS 1e-4 (an autoencoder's are 1e-5 to 1e-4): with the default eps (1e-8,
    # under the square roots) the normalised features and Adam-like ratios shrink, so the step
    # differs from the step for the same gradients at scale 1; with eps=1e-20 it is the same.
    # (After one update the 0.9999 momentum is 1e-4 g, its square 1e-16: still far above 1e-20.)
    grads = grads_like(PARAMS)
    steps = {}
    for eps in (1e-8, 1e-20):
        lopt = MLPLOpt(magnitude_features=False, eps=eps)
        opt = lopt.optimizer(lopt.init(jax.random.key(5)))
        state = opt.init(PARAMS)
        for scale in (1.0, 1e-4):
            tiny = jax.tree.map(lambda g: g * scale, grads)
            steps[eps, scale] = opt.update(tiny, state, PARAMS)[0]["dense"]
    np.testing.assert_allclose(steps[1e-20, 1e-4], steps[1e-20, 1.0], rtol=1e-4, atol=1e-9)
    assert not np.allclose(steps[1e-8, 1e-4], steps[1e-8, 1.0], rtol=1e-2)


def test_width_base_scales_the_step_of_wide_tensors_only():
    # muP-style: a tensor of fan-in f > b steps b / f times as far; vectors, scalars and
    # tensors of fan-in <= b are unchanged. The same theta with and without it.
    params = {"wide": jnp.linspace(-1.0, 1.0, 128 * 3).reshape(128, 3),
              "narrow": jnp.linspace(-1.0, 1.0, 24).reshape(8, 3),
              "conv": jnp.linspace(-2.0, 2.0, 72).reshape(3, 3, 2, 4),
              "bias": jnp.linspace(-1.0, 1.0, 300)}
    grads = grads_like(params, seed=3)
    theta = MLPLOpt().init(jax.random.key(2))
    steps = {}
    for base in (0, 16):
        opt = MLPLOpt(width_base=base).optimizer(theta)
        steps[base] = opt.update(grads, opt.init(params), params)[0]
    np.testing.assert_allclose(steps[16]["wide"], steps[0]["wide"] * 16 / 128, rtol=1e-6)
    np.testing.assert_allclose(steps[16]["conv"], steps[0]["conv"] * 16 / 18, rtol=1e-6)  # 3*3*2
    np.testing.assert_allclose(steps[16]["narrow"], steps[0]["narrow"], rtol=1e-6)
    np.testing.assert_allclose(steps[16]["bias"], steps[0]["bias"], rtol=1e-6)
    assert not np.allclose(steps[16]["wide"], steps[0]["wide"])
    with pytest.raises(ValueError, match="width_base"):
        MLPLOpt(width_base=-1)


def test_depth_power_scales_every_step_of_a_deep_model_and_not_a_shallow_one():
    # K ** -a for a model of K >= 1 tensors of two or more dimensions, the biases included;
    # a model of vectors only (a quadratic) is not scaled. The same theta with and without it.
    theta = MLPLOpt().init(jax.random.key(5))
    models = {
        "quadratic": {"x": jnp.linspace(-1.0, 1.0, 7)},
        "logistic": {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)},
        "mlp": {"w1": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4),
                "w2": jnp.linspace(-1.0, 1.0, 8).reshape(4, 2),
                "conv": jnp.linspace(-2.0, 2.0, 72).reshape(3, 3, 2, 4)},
    }
    for name, params in models.items():
        grads = grads_like(params, seed=4)
        steps = {}
        for power in (0.0, 1.5):
            opt = MLPLOpt(width_base=0, depth_power=power).optimizer(theta)
            steps[power] = opt.update(grads, opt.init(params), params)[0]
        factor = {"quadratic": 1.0, "logistic": 1.0, "mlp": 3 ** -1.5}[name]
        for key in params:
            np.testing.assert_allclose(steps[1.5][key], steps[0.0][key] * factor, rtol=1e-6)
        assert MLPLOpt(depth_power=1.5).depth_factor(MLPLOpt.depth(
            jnp.shape(p) for p in params.values())) == factor
    for bad in (-1.0, 5.0, True, "1"):
        with pytest.raises(ValueError, match="depth_power"):
            MLPLOpt(depth_power=bad)


def ratio_rms(state, key):
    """``r`` of ``ratio_step_scale`` for ``state``'s tensor ``key``, with NumPy: the RMS of the
    clipped ``m / sqrt(v + 1e-8)`` at decay 0.9."""
    m = np.asarray(state.momenta[key])[..., MLPLOpt().decays.index(0.9)]
    v = np.asarray(state.rms[key])
    return np.sqrt(np.mean(np.clip(m / np.sqrt(v + 1e-8), -5.0, 5.0) ** 2))


def test_ratio_step_scale_shrinks_each_step_with_its_tensors_adam_ratio():
    # Each tensor's step is the plain LO's times r, the RMS of its clipped m / sqrt(v + eps) at
    # decay 0.9, computed here from the state with NumPy. After 40 steps of unit gradients and
    # 100 of gradients 1e-4 as large, r < 0.01 (v remembers the large ones), and the step
    # shrinks with it: what lets a learned optimizer converge as Adam does on a deterministic
    # problem.
    theta = MLPLOpt().init(jax.random.key(6))
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}
    plain, scaled = (MLPLOpt(ratio_step_scale=flag).optimizer(theta) for flag in (False, True))
    state_p, state_s = plain.init(params), scaled.init(params)
    grads = grads_like(params, seed=7)
    for size in [1.0] * 40 + [1e-4] * 100:
        g = jax.tree.map(lambda x: x * size, grads)
        step_p, state_p = plain.update(g, state_p, params)
        step_s, state_s = scaled.update(g, state_s, params)
    for key in params:
        r = ratio_rms(state_s, key)
        assert 0 < r < 0.01
        np.testing.assert_allclose(step_s[key], step_p[key] * r, rtol=1e-5)
    with pytest.raises(ValueError, match="ratio_step_scale"):
        MLPLOpt(ratio_step_scale=True, decays=(0.5, 0.99))


def test_ratio_step_knee_leaves_steps_alone_until_r_falls_below_it():
    # With a knee k the factor is min(1, r / k): at unit gradients (r = 5, the clip, at step
    # 10) the step is the plain LO's, not 5 times it; after the gradient falls 1e4-fold it is
    # the plain step times r / k, r computed with NumPy from the state.
    theta = MLPLOpt().init(jax.random.key(8))
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}
    plain, kneed = (MLPLOpt(ratio_step_scale=flag, ratio_step_knee=0.25 if flag else 0.0)
                    .optimizer(theta) for flag in (False, True))
    state_p, state_k = plain.init(params), kneed.init(params)
    grads = grads_like(params, seed=9)
    for i, size in enumerate([1.0] * 40 + [1e-4] * 100):
        g = jax.tree.map(lambda x: x * size, grads)
        step_p, state_p = plain.update(g, state_p, params)
        step_k, state_k = kneed.update(g, state_k, params)
        if i in (9, 139):
            for key in params:
                r = ratio_rms(state_k, key)
                assert (r > 1) if i == 9 else (0 < r < 0.01)
                np.testing.assert_allclose(step_k[key], step_p[key] * min(1.0, r / 0.25),
                                           rtol=1e-5)
    for bad in (-0.1, 6.0, True):
        with pytest.raises(ValueError, match="ratio_step_knee"):
            MLPLOpt(ratio_step_scale=True, ratio_step_knee=bad)
    with pytest.raises(ValueError, match="ratio_step_knee needs ratio_step_scale"):
        MLPLOpt(ratio_step_knee=0.25)


def with_rate_output(theta, w_col, b):
    """``theta`` of a plain LO with a third output column (weights ``w_col``, bias ``b``)."""
    theta = jax.tree.map(lambda x: x, theta)
    last = theta["layers"][-1]
    last["w"] = jnp.concatenate([last["w"], jnp.reshape(w_col, (-1, 1))], axis=1)
    last["b"] = jnp.concatenate([last["b"], jnp.asarray([b], jnp.float32)])
    return theta


def test_linear_step_schedule_decays_the_plain_step_to_zero_over_the_horizon():
    # The same weights with and without the schedule: update t of a T-update run is the
    # constant schedule's times 1 - (t - 1) / T, and nothing after the last.
    theta, horizon = MLPLOpt().init(jax.random.key(6)), 5
    grads = grads_like(PARAMS, seed=3)
    plain = MLPLOpt().optimizer(theta)
    decayed = MLPLOpt(step_schedule="linear").optimizer(theta, num_steps=horizon)
    state_p, state_d = plain.init(PARAMS), decayed.init(PARAMS)
    for t in range(1, horizon + 3):
        step_p, state_p = plain.update(grads, state_p, PARAMS)
        step_d, state_d = decayed.update(grads, state_d, PARAMS)
        factor = max(0.0, 1.0 - (t - 1) / horizon)
        for key in PARAMS:
            assert np.any(step_p[key])
            np.testing.assert_allclose(step_d[key], step_p[key] * factor, rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match="step_schedule='linear'.*num_steps"):
        MLPLOpt(step_schedule="linear").optimizer(theta).init(PARAMS)
    with pytest.raises(ValueError, match="step_schedule must be one of"):
        MLPLOpt(step_schedule="cosine")


def test_step_adaptation_scales_each_tensor_by_its_integrated_rate_output():
    # The state's log scale s per tensor moves by eta * tanh(mean of the third output over the
    # tensor) each step, clipped to [-5, 5], and the tensor's step is the plain LO's times
    # exp(s). Checked against the plain LO (the same first two outputs) and NumPy.
    plain_lopt, eta = MLPLOpt(), 0.1
    lopt = MLPLOpt(step_adaptation=eta)
    assert (lopt.num_outputs, plain_lopt.num_outputs) == (3, 2)
    fresh = lopt.init(jax.random.key(3))  # a random LO starts without adaptation
    assert fresh["layers"][-1]["w"].shape[1] == 3
    assert not np.any(fresh["layers"][-1]["w"][:, 2]) and not np.any(fresh["layers"][-1]["b"])
    theta = plain_lopt.init(jax.random.key(4))
    width = theta["layers"][-1]["w"].shape[0]
    grads = grads_like(PARAMS, seed=2)
    cases = {"off": with_rate_output(theta, jnp.zeros(width), 0.0),
             "up": with_rate_output(theta, jnp.zeros(width), 3.0),
             "down": with_rate_output(theta, jnp.zeros(width), -0.5),
             "features": with_rate_output(theta, jax.random.normal(jax.random.key(5), (width,)),
                                          0.1)}
    plain = plain_lopt.optimizer(theta)
    plain_update = jax.jit(plain.update)
    for name, adapted_theta in cases.items():
        opt = lopt.optimizer(adapted_theta)
        state_p, state_a = plain.init(PARAMS), opt.init(PARAMS)
        adapted_update = jax.jit(opt.update)
        s = {key: 0.0 for key in PARAMS}
        for _ in range(60):
            step_p, state_p = plain_update(grads, state_p, PARAMS)
            step_a, state_a = adapted_update(grads, state_a, PARAMS)
            for key in PARAMS:
                if name == "features":  # the rate output on this step's features, by value
                    depth = MLPLOpt.depth(jnp.shape(p) for p in PARAMS.values())
                    rate = lopt.apply_mlp(adapted_theta,
                                          all_features(lopt, grads, state_a, key, depth))[2]
                    drift = np.tanh(np.mean(rate))
                else:
                    drift = np.tanh(float(adapted_theta["layers"][-1]["b"][2]))
                s[key] = float(np.clip(s[key] + eta * drift, -5.0, 5.0))
                np.testing.assert_allclose(state_a.log_scales[key], s[key], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(step_a[key], step_p[key] * np.exp(s[key]),
                                           rtol=2e-4, atol=1e-9)
        if name == "up":  # 60 steps of 0.1 * tanh(3) reach the clip
            assert all(v == 5.0 for v in s.values())
        if name == "off":
            assert all(v == 0.0 for v in s.values())
        if name == "down":
            assert all(-3.0 < v < -2.0 for v in s.values())
    # jit and the optax API see the scales as ordinary state
    opt = as_optax(lopt, cases["up"])
    update = jax.jit(opt.update)
    state = opt.init(PARAMS)
    for _ in range(3):
        _, state = update(grads, state, PARAMS)
    assert float(state.log_scales["dense"]) == pytest.approx(3 * eta * np.tanh(3.0), rel=1e-5)
    for bad in (-0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="step_adaptation"):
            MLPLOpt(step_adaptation=bad)


def all_features(lopt, grads, state, name, depth=0):
    """The full ``(n, num_features)`` matrix of ``PARAMS[name]`` (the module docstring's
    order), from the gradients and the state after the update that used them; ``depth``: the
    model's (with ``depth_features``)."""
    return lopt.features(jnp.ravel(grads[name]), jnp.ravel(PARAMS[name]),
                         state.momenta[name].reshape(-1, len(lopt.decays)),
                         jnp.ravel(state.rms[name]), state.step, state.horizon,
                         jnp.shape(PARAMS[name]), depth=depth)


def assert_update_is_the_mlp(lopt, theta, update, feats):
    """``update`` (a tensor of :data:`PARAMS`, from an LO with the default depth rule) is the
    plain MLP's step ``-d * exp(c_m * m) * c_s`` on ``feats``, times
    :data:`PARAMS_DEPTH_FACTOR`."""
    assert lopt.depth_power == 1.5
    d, m = lopt.apply_mlp(theta, feats)
    np.testing.assert_allclose(
        jnp.ravel(update), -d * jnp.exp(lopt.exp_mult * m) * lopt.step_mult * PARAMS_DEPTH_FACTOR,
        rtol=1e-5, atol=1e-10)


def test_update_equals_the_mlp_on_all_features():
    # The update folds the shared features into the first layer's bias; the reference is the
    # plain MLP on the full feature matrix of the module docstring.
    lopt = MLPLOpt()
    theta = lopt.init(jax.random.key(4))
    opt = lopt.optimizer(theta)
    grads = grads_like(PARAMS)
    updates, state = opt.update(grads, opt.init(PARAMS), PARAMS)
    # Per-tensor normalisation makes each tensor's features independent of the others.
    assert_update_is_the_mlp(lopt, theta, updates["dense"],
                             all_features(lopt, grads, state, "dense"))


def test_horizon_features_are_the_fraction_done_and_fold_into_the_update():
    # The fraction t / T and its cube follow the step-count embedding; the update (which folds
    # the shared features into the first layer's bias) equals the MLP on all features.
    lopt = MLPLOpt(horizon_features=True)
    assert lopt.num_features == MLPLOpt().num_features + 2
    theta = lopt.init(jax.random.key(4))
    opt = lopt.optimizer(theta, num_steps=8)
    grads = grads_like(PARAMS)
    state = opt.init(PARAMS)
    assert float(state.horizon) == 8.0
    for _ in range(2):
        updates, state = opt.update(grads, state, PARAMS)
    time = lopt.shared_features(state.step, state.horizon)
    np.testing.assert_allclose(time[-2:], [0.25, 0.25 ** 3], rtol=1e-6)
    np.testing.assert_allclose(lopt.shared_features(jnp.asarray(20), jnp.asarray(8.0))[-2:],
                               [1, 1])
    assert_update_is_the_mlp(lopt, theta, updates["dense"],
                             all_features(lopt, grads, state, "dense"))


def test_tensor_features_are_the_log_fans_and_tell_a_bias_from_a_weight():
    lopt = MLPLOpt(tensor_features=True)
    assert lopt.num_features == MLPLOpt().num_features + 2
    theta = lopt.init(jax.random.key(8))
    opt = lopt.optimizer(theta)
    grads = grads_like(PARAMS)
    updates, state = opt.update(grads, opt.init(PARAMS), PARAMS)
    feats = all_features(lopt, grads, state, "conv")  # HWIO (3, 3, 2, 4): fan-in 18, fan-out 4
    cols = slice(-len(lopt.timescales) - 2, -len(lopt.timescales))
    np.testing.assert_allclose(feats[:, cols], np.broadcast_to(np.log([18, 4]) / 5, (72, 2)),
                               rtol=1e-6)
    assert_update_is_the_mlp(lopt, theta, updates["conv"], feats)
    # the same gradients, parameters and state in a (12,) vector and a (3, 4) matrix step
    # differently only with the tensor features
    flat = {"w": jnp.ravel(PARAMS["dense"])}
    for flag, same in ((True, False), (False, True)):
        lo = MLPLOpt(tensor_features=flag)
        o = lo.optimizer(lo.init(jax.random.key(8)))
        as_matrix = o.update({"w": grads["dense"]}, o.init({"w": PARAMS["dense"]}),
                             {"w": PARAMS["dense"]})[0]["w"]
        as_vector = o.update({"w": jnp.ravel(grads["dense"])}, o.init(flat), flat)[0]["w"]
        assert np.allclose(jnp.ravel(as_matrix), as_vector, rtol=1e-6) == same


def test_depth_features_count_the_weight_tensors_and_tell_a_logistic_from_an_mlp():
    lopt = MLPLOpt(depth_features=True)
    assert lopt.num_features == MLPLOpt().num_features + 1
    assert lopt.num_shared_features == MLPLOpt().num_shared_features + 1
    assert MLPLOpt.depth([(), (5,), (3, 4), (3, 3, 2, 4)]) == 2
    theta = lopt.init(jax.random.key(9))
    opt = lopt.optimizer(theta)
    grads = grads_like(PARAMS)
    updates, state = opt.update(grads, opt.init(PARAMS), PARAMS)
    # PARAMS has two tensors of two or more dimensions (dense and conv): the last column is
    # 1 / (1 + 2) for every parameter, and the update is the MLP on all features
    feats = all_features(lopt, grads, state, "dense", depth=2)
    np.testing.assert_allclose(feats[:, -1], 1 / 3, rtol=1e-6)
    assert_update_is_the_mlp(lopt, theta, updates["dense"], feats)
    # one weight matrix alone (a logistic regression) and the same matrix beside a second one
    # (an MLP's last layer, same gradient, parameter and state) step differently only with
    # the depth feature (the depth rule, which scales the steps too, is off here)
    alone = {"w": PARAMS["dense"]}
    deeper = {"w": PARAMS["dense"], "v": jnp.ones((4, 2))}
    for flag, same in ((True, False), (False, True)):
        lo = MLPLOpt(depth_features=flag, depth_power=0)
        o = lo.optimizer(lo.init(jax.random.key(9)))
        step_alone = o.update({"w": grads["dense"]}, o.init(alone), alone)[0]["w"]
        step_deeper = o.update({"w": grads["dense"], "v": jnp.ones((4, 2))}, o.init(deeper),
                               deeper)[0]["w"]
        assert np.allclose(step_alone, step_deeper, rtol=1e-6) == same


def test_bias_correction_reads_adams_corrected_moments_and_keeps_the_state_raw():
    grads = grads_like(PARAMS)
    # After one update from zero, every corrected momentum is g and the corrected accumulator
    # is g**2, whatever the decays: with the correction the first step does not depend on them.
    first = {}
    for flag in (True, False):
        for rms_decay in (0.9, 0.999):
            lopt = MLPLOpt(bias_correction=flag, rms_decay=rms_decay)
            opt = lopt.optimizer(lopt.init(jax.random.key(3)))
            first[flag, rms_decay] = opt.update(grads, opt.init(PARAMS), PARAMS)[0]["dense"]
    np.testing.assert_allclose(first[True, 0.9], first[True, 0.999], rtol=1e-5)
    assert not np.allclose(first[False, 0.9], first[False, 0.999], rtol=1e-3)

    # After three updates, the update is the MLP on features of m / (1 - b**3), v / (1 - b_v**3),
    # while the state holds the uncorrected accumulators, as without the correction.
    lopt, plain = MLPLOpt(bias_correction=True), MLPLOpt()
    theta = lopt.init(jax.random.key(5))
    opt, plain_opt = lopt.optimizer(theta), plain.optimizer(theta)
    state, plain_state = opt.init(PARAMS), plain_opt.init(PARAMS)
    for seed in range(3):
        g = grads_like(PARAMS, seed)
        updates, state = opt.update(g, state, PARAMS)
        plain_updates, plain_state = plain_opt.update(g, plain_state, PARAMS)
    jax.tree.map(np.testing.assert_array_equal, state, plain_state)
    assert not np.allclose(updates["dense"], plain_updates["dense"], rtol=1e-3)
    decays = np.asarray(lopt.decays)  # float64: 1 - b**3 exactly enough
    m = np.asarray(state.momenta["dense"]).reshape(-1, len(decays)) / (1 - decays ** 3)
    v = np.ravel(state.rms["dense"]) / (1 - lopt.rms_decay ** 3)
    feats = lopt.features(jnp.ravel(g["dense"]), jnp.ravel(PARAMS["dense"]),
                          jnp.asarray(m, jnp.float32), jnp.asarray(v, jnp.float32), state.step,
                          None, (3, 4))
    assert_update_is_the_mlp(lopt, theta, updates["dense"], feats)


def test_the_horizon_changes_the_step_only_for_an_lo_that_reads_it():
    steps = {}
    for flag in (True, False):
        lopt = MLPLOpt(horizon_features=flag)
        theta = lopt.init(jax.random.key(6))
        for horizon in (10, 1000):
            opt = lopt.optimizer(theta, num_steps=horizon)
            steps[flag, horizon] = opt.update(grads_like(PARAMS), opt.init(PARAMS), PARAMS)[0]
    assert not np.allclose(steps[True, 10]["dense"], steps[True, 1000]["dense"], rtol=1e-4)
    np.testing.assert_array_equal(steps[False, 10]["dense"], steps[False, 1000]["dense"])
    # without the features the state is what it always was (no horizon leaf): old checkpoints fit
    plain = MLPLOpt().optimizer(MLPLOpt().init(jax.random.key(0)), num_steps=5).init(PARAMS)
    assert plain.horizon is None and len(jax.tree.leaves(plain)) == 2 * len(PARAMS) + 1


def test_a_horizon_lo_needs_a_valid_num_steps():
    lopt = MLPLOpt(horizon_features=True)
    theta = lopt.init(jax.random.key(0))
    with pytest.raises(ValueError, match="pass num_steps"):
        as_optax(lopt, theta).init(PARAMS)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_steps must be a positive int"):
            lopt.optimizer(theta, num_steps=bad)
    # a traced horizon (an inner problem's sampled length) is fine under jit
    init = jax.jit(lambda n: lopt.optimizer(theta, num_steps=n).init(PARAMS))
    assert float(init(jnp.asarray(300)).horizon) == 300.0


def test_random_lo_is_an_optax_optimizer_in_jit_and_chain():
    lopt = MLPLOpt()
    opt = optax.chain(optax.clip_by_global_norm(1.0), as_optax(lopt, lopt.init(jax.random.key(3))))
    state = opt.init(PARAMS)

    @jax.jit
    def step(params, state):
        grads = grads_like(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = step(PARAMS, state)
    assert jax.tree.structure(params) == jax.tree.structure(PARAMS)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    assert any(float(jnp.max(jnp.abs(a - b))) > 0 for a, b in
               zip(jax.tree.leaves(params), jax.tree.leaves(PARAMS)))


def test_population_of_thetas_vmaps():
    lopt = MLPLOpt()
    thetas = jax.vmap(lopt.init)(jax.random.split(jax.random.key(0), 5))
    grads = grads_like(PARAMS)

    def update(theta):
        opt = lopt.optimizer(theta)
        return opt.update(grads, opt.init(PARAMS), PARAMS)[0]

    updates = jax.jit(jax.vmap(update))(thetas)
    assert updates["conv"].shape == (5, 3, 3, 2, 4)
    single = update(jax.tree.map(lambda x: x[2], thetas))
    np.testing.assert_allclose(updates["conv"][2], single["conv"], rtol=1e-5, atol=1e-9)
    assert 1000 <= sum(x.size for x in jax.tree.leaves(lopt.init(jax.random.key(0)))) <= 5000


def test_integer_leaf_is_rejected_by_name():
    opt = MLPLOpt().optimizer(MLPLOpt().init(jax.random.key(0)))
    with pytest.raises(TypeError, match=r"\['count'\].*int32"):
        opt.init({"w": jnp.ones(3), "count": jnp.ones(3, jnp.int32)})
    with pytest.raises(TypeError, match="int32"):
        LearnedSGD().optimizer(LearnedSGD().init(None)).init(jnp.arange(3))


def test_mismatched_theta_is_rejected_by_leaf_and_shape():
    small, default = MLPLOpt(hidden=(8,)), MLPLOpt()
    with pytest.raises(ValueError, match="structure"):
        as_optax(default, small.init(jax.random.key(0)))
    wrong = default.init(jax.random.key(0))
    wrong["layers"][1]["w"] = jnp.zeros((32, 31))
    with pytest.raises(ValueError, match=r"\['layers'\]\[1\]\['w'\].*\(32, 31\).*\(32, 32\)"):
        as_optax(default, wrong)


def test_update_without_params_is_a_clear_error():
    opt = MLPLOpt().optimizer(MLPLOpt().init(jax.random.key(0)))
    with pytest.raises(ValueError, match="needs params"):
        opt.update(PARAMS, opt.init(PARAMS))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sgd_like_theta_reduces_every_task_loss(family):
    lopt = MLPLOpt()
    task = make_task({"family": family, "seed": 1})
    opt = as_optax(lopt, sgd_like_theta(lopt, scale=10.0))  # normalised steps of 0.01
    losses = train_losses(task, opt, jax.random.key(0), num_steps=150)
    assert np.all(np.isfinite(losses))
    assert losses[-10:].mean() < 0.9 * losses[:10].mean(), (losses[:10].mean(), losses[-10:].mean())


def loss_trend_reference(losses):
    """Feature 9 after each loss, in float64 numpy, from the module docstring's definition."""
    out, fast = [], None
    for t, loss in enumerate(losses, start=1):
        if t == 1:
            fast = slow = loss
            deviation = 0.0
        else:
            loss = loss if np.isfinite(loss) else slow
            fast = 0.9 * fast + 0.1 * loss
            slow = 0.99 * slow + 0.01 * loss
            deviation = 0.99 * deviation + 0.01 * abs(loss - slow)
        corrected = deviation / max(1 - 0.99 ** (t - 1), 1e-6)
        scale = 1 / (corrected + 1e-12 + 1e-7 * abs(slow))
        out.append(np.clip([(fast - slow) * scale, (loss - slow) * scale], -5, 5))
    return np.asarray(out)


def test_loss_features_follow_their_definition_and_fold_into_the_update():
    lopt = MLPLOpt(loss_features=True)
    assert lopt.num_features == MLPLOpt().num_features + 2
    theta = lopt.init(jax.random.key(6))
    opt = lopt.optimizer(theta)
    losses = [4.0, 2.0, 3.0, 1.5, float("nan"), 1.0, 1.2]
    reference = loss_trend_reference(losses)
    state = opt.init(PARAMS)
    for t, loss in enumerate(losses):
        grads = grads_like(PARAMS, t)
        updates, state = opt.update(grads, state, PARAMS, loss=jnp.asarray(loss))
        shared = lopt.shared_features(state.step, None, state.loss_stats,
                                    jnp.asarray(loss if np.isfinite(loss) else state.loss_stats[1]))
        np.testing.assert_allclose(shared[-2:], reference[t], rtol=1e-4, atol=1e-5)
    assert np.all(np.isfinite(jax.tree.leaves(updates)[0]))
    feats = lopt.features(jnp.ravel(grads["dense"]), jnp.ravel(PARAMS["dense"]),
                          state.momenta["dense"].reshape(-1, len(lopt.decays)),
                          jnp.ravel(state.rms["dense"]), state.step, None, (3, 4),
                          state.loss_stats, jnp.asarray(losses[-1]))
    assert_update_is_the_mlp(lopt, theta, updates["dense"], feats)


def test_loss_features_are_scale_and_shift_free_and_change_the_step():
    lopt = MLPLOpt(loss_features=True)
    opt = lopt.optimizer(lopt.init(jax.random.key(7)))

    def last_update(losses):
        state = opt.init(PARAMS)
        for t, loss in enumerate(losses):
            updates, state = opt.update(grads_like(PARAMS, t), state, PARAMS,
                                        loss=jnp.asarray(loss, jnp.float32))
        return updates["dense"]

    falling = np.array([3.0, 2.5, 2.2, 2.0, 1.7, 1.6])
    base = last_update(falling)
    np.testing.assert_allclose(last_update(100 * falling - 50), base, rtol=1e-4, atol=1e-9)
    assert not np.allclose(last_update(falling[::-1]), base, rtol=1e-3)


def test_loss_features_need_the_loss():
    lopt = MLPLOpt(loss_features=True)
    opt = lopt.optimizer(lopt.init(jax.random.key(0)))
    with pytest.raises(ValueError, match="pass the loss"):
        opt.update(grads_like(PARAMS), opt.init(PARAMS), PARAMS)
    # evaluation passes the loss to every learned optimizer
    losses = train_losses(make_task({"family": "quadratic", "dim": 4}), opt,
                          jax.random.key(1), 5)
    assert np.all(np.isfinite(losses))
