"""The MLP learned optimizer: its update by value, any pytree, optax compatibility, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfopt.evaluate import train_losses
from selfopt.lopt import LearnedSGD, MLPLOpt, as_optax
from selfopt.lopt import mlp_lopt
from selfopt.lopt.mlp_lopt import EPS
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
    # F = 2 + 3 * len(decays) + 1 + 3 + len(timescales)
    assert MLPLOpt(decays=(0.9,), timescales=(1.0, 10.0)).num_features == 2 + 3 + 1 + 3 + 2
    assert lopt.num_shared_features == len(lopt.timescales) == 6
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


def test_magnitude_features_are_clipped_log_magnitudes_and_make_the_step_see_the_scale():
    # Feature 5, computed with NumPy: log(|x| + 1e-12) / 5 of g, p and sqrt(v), clipped to
    # [-5, 5] (the extremes here hit both clips). The other per-parameter features are scale
    # free, so these are what make a gradient 1000x larger step differently.
    lopt = MLPLOpt()
    k = len(lopt.decays)
    g = jnp.asarray([1e-20, -3e-4, 0.5, -2.0, 1e12])
    p = jnp.asarray([0.0, 1.5, -1e-3, 1e13, 7.0])
    v = jnp.asarray([0.0, 1e-6, 0.25, 4.0, 1e24])
    m = jnp.stack([g] * k, axis=1)
    feats = np.asarray(lopt.features(g, p, m, v, jnp.asarray(1)))
    cols = slice(3 + 2 * k, 6 + 2 * k)  # after g, p, momenta, rms, normalised Adam-like
    expected = np.clip(np.log(np.abs(np.stack([g, p, np.sqrt(v)], axis=1).astype(np.float64))
                              + 1e-12) / 5, -5, 5)
    np.testing.assert_allclose(feats[:, cols], expected, rtol=1e-5, atol=1e-6)
    assert feats[0, cols.start] == -5.0 and feats[4, cols.start] == 5.0
    # Scales well above the normalisation's epsilon (the 0.9999 momentum starts at 1e-4 g).
    opt = lopt.optimizer(lopt.init(jax.random.key(5)))
    grads = grads_like(PARAMS)
    steps = {scale: opt.update(jax.tree.map(lambda x: x * scale, grads), opt.init(PARAMS),
                               PARAMS)[0]["dense"] for scale in (1e3, 1e6)}
    assert not np.allclose(steps[1e3], steps[1e6], rtol=1e-3)


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
        depth = {"quadratic": 0, "logistic": 1, "mlp": 3}[name]  # tensors of ndim >= 2
        factor = {"quadratic": 1.0, "logistic": 1.0, "mlp": 3 ** -1.5}[name]
        for key in params:
            np.testing.assert_allclose(steps[1.5][key], steps[0.0][key] * factor, rtol=1e-6)
        assert MLPLOpt(depth_power=1.5).depth_factor(depth) == pytest.approx(factor, rel=1e-12)
        assert MLPLOpt(depth_power=0).depth_factor(depth) == 1.0
    for bad in (-1.0, 5.0, True, "1"):
        with pytest.raises(ValueError, match="depth_power"):
            MLPLOpt(depth_power=bad)


def all_features(lopt, grads, state, name):
    """The full ``(n, num_features)`` matrix of ``PARAMS[name]`` (the module docstring's
    order), from the gradients and the state after the update that used them."""
    return lopt.features(jnp.ravel(grads[name]), jnp.ravel(PARAMS[name]),
                         state.momenta[name].reshape(-1, len(lopt.decays)),
                         jnp.ravel(state.rms[name]), state.step)


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


@pytest.mark.parametrize("block_rows", [None, 5], ids=["one-block", "blocks-of-5"])
def test_the_update_is_the_mlp_on_features_built_by_hand_with_numpy(monkeypatch, block_rows):
    # An independent reference for the whole update after three steps: accumulators, features
    # 1-7 and the MLP, all in float64 NumPy from the module docstring. Blocks of 5 rows: the
    # MLP runs over two whole blocks of the 12 parameters and a remainder of 2.
    if block_rows:
        monkeypatch.setattr(mlp_lopt, "MLP_BLOCK_ROWS", block_rows)
    lopt = MLPLOpt(hidden=(8, 4))
    theta = lopt.init(jax.random.key(11))
    opt = lopt.optimizer(theta)
    state = opt.init(PARAMS)
    b, bv = np.asarray(lopt.decays), lopt.rms_decay
    m = np.zeros((12, len(b)))
    v = np.zeros(12)
    for seed in range(3):
        grads = grads_like(PARAMS, seed)
        updates, state = opt.update(grads, state, PARAMS)
        g = np.ravel(grads["dense"]).astype(np.float64)
        m = b * m + (1 - b) * g[:, None]
        v = bv * v + (1 - bv) * g ** 2
    p = np.ravel(PARAMS["dense"]).astype(np.float64)
    adam = m / np.sqrt(v + EPS)[:, None]
    scaled = np.concatenate([g[:, None], p[:, None], m, np.sqrt(v)[:, None], adam], axis=1)
    scaled = np.clip(scaled / np.sqrt(np.mean(scaled ** 2, axis=0) + EPS), -5, 5)
    mags = np.clip(np.log(np.abs(np.stack([g, p, np.sqrt(v)], axis=1)) + 1e-12) / 5, -5, 5)
    time = np.broadcast_to(np.tanh(3 / np.asarray(lopt.timescales)), (12, 6))
    x = np.concatenate([scaled, mags, np.clip(adam, -5, 5), time], axis=1)
    layers = [{k: np.asarray(a, np.float64) for k, a in layer.items()} for layer in theta["layers"]]
    for layer in layers[:-1]:
        x = np.maximum(x @ layer["w"] + layer["b"], 0)
    out = x @ layers[-1]["w"] + layers[-1]["b"]
    expected = (-out[:, 0] * np.exp(lopt.exp_mult * out[:, 1]) * lopt.step_mult
                * PARAMS_DEPTH_FACTOR)
    np.testing.assert_allclose(np.ravel(updates["dense"]), expected, rtol=1e-4, atol=1e-10)


def test_num_steps_and_the_loss_are_accepted_and_ignored():
    # The protocol's num_steps and loss= are for architectures that read them; this one does
    # not: the step is the same whatever they are, and the state is the momenta, the
    # accumulator and the step count (no leaf for a horizon or a loss).
    lopt = MLPLOpt()
    theta = lopt.init(jax.random.key(6))
    grads = grads_like(PARAMS)
    steps = []
    for num_steps, extra in ((None, {}), (10, {"loss": jnp.asarray(1.0)}),
                             (1000, {"loss": jnp.asarray(-50.0)})):
        opt = lopt.optimizer(theta, num_steps=num_steps)
        state = opt.init(PARAMS)
        assert len(jax.tree.leaves(state)) == 2 * len(PARAMS) + 1
        steps.append(opt.update(grads, state, PARAMS, **extra)[0])
    for other in steps[1:]:
        jax.tree.map(np.testing.assert_array_equal, steps[0], other)


@pytest.mark.parametrize("field,value", [
    ("hidden", []), ("hidden", (0,)), ("hidden", (8,) * 5), ("hidden", (8.0,)),
    ("hidden", 32), ("decays", ()), ("decays", (0.9, 1.0)), ("timescales", (1.0, 0.0)),
    ("rms_decay", 1.0), ("rms_decay", 0), ("step_mult", 0.0), ("exp_mult", -1e-3),
    ("feature_clip", "5"), ("feature_clip", float("inf")), ("width_base", -1),
    ("width_base", 2.5), ("depth_power", 5.0), ("depth_power", True),
])
def test_a_bad_field_is_a_one_line_error_that_names_it(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be .*, got ") as err:
        MLPLOpt(**{field: value})
    assert "\n" not in str(err.value)


def test_list_fields_become_tuples_so_the_lo_stays_hashable():
    lopt = MLPLOpt(hidden=[8, 8], decays=[0.9, 0.99], timescales=[1, 10])
    assert lopt == MLPLOpt(hidden=(8, 8), decays=(0.9, 0.99), timescales=(1, 10))
    assert hash(lopt) == hash(MLPLOpt(hidden=(8, 8), decays=(0.9, 0.99), timescales=(1, 10)))


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
