"""Task families: they build offline, jit with the task as an argument, vmap, and train; the
task distribution's configurations validate, and the held-out set is disjoint from training."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfopt.evaluate import train_losses
from selfopt.lopt import as_optax
from selfopt.tasks.classifiers import ACTIVATIONS, apply_mlp
from selfopt.tasks.datasets import load_images
from selfopt.tasks import (FAMILIES, HELDOUT_FAMILIES, HELDOUT_SEED_START, TEST_FUNCTIONS,
                           TRAIN_FAMILIES, TRAIN_GRIDS, TaskDistribution, make_task)

#: The training families of ``selfopt train`` by default.
DEFAULT_FAMILIES = ("quadratic", "test_function", "logistic", "mlp")
#: family -> Adam learning rate for the training check.
LEARNING_RATES = {"quadratic": 0.05, "test_function": 0.05, "logistic": 0.01, "mlp": 0.01,
                  "convnet": 0.01, "language_model": 0.01, "autoencoder": 0.01,
                  "lopt_training": 0.01, "regression": 0.01}
#: family -> the most that mean(last losses) / mean(first losses) may be after training.
MAX_LOSS_RATIO = {"quadratic": 0.05, "test_function": 0.5, "logistic": 0.6, "mlp": 0.5,
                  "convnet": 0.5, "language_model": 0.8, "autoencoder": 0.3,
                  "lopt_training": 0.75, "regression": 0.5}


def init_and_loss(task, key, split="train"):
    return task.loss(task.init(key), task.sample_batch(key, split))


@jax.jit
def initial_losses(task, keys):
    """Train and test losses at initialisation, one per key: the task vmaps over keys."""
    params = jax.vmap(task.init)(keys)
    return {split: jax.vmap(task.loss)(
                params, jax.vmap(functools.partial(task.sample_batch, split=split))(keys))
            for split in ("train", "test")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_jits_vmaps_and_trains(family):
    task = make_task({"family": family, "seed": 3})
    key = jax.random.key(0)
    for losses in initial_losses(task, jax.random.split(key, 3)).values():
        assert losses.shape == (3,) and jnp.all(jnp.isfinite(losses))
        assert task.normalize(losses[0], losses[0]) == pytest.approx(1.0)
        assert task.normalize(task.loss_floor, losses[0]) == pytest.approx(0.0)

    losses = train_losses(task, optax.adam(LEARNING_RATES[family]), key, 200)
    assert jnp.all(jnp.isfinite(losses))
    ratio = losses[-20:].mean() / losses[:20].mean()
    assert ratio < MAX_LOSS_RATIO[family], (family, float(ratio))


@pytest.mark.parametrize("function", sorted(TEST_FUNCTIONS))
def test_every_test_function_trains(function):
    task = make_task({"family": "test_function", "function": function, "noise": 0.1})
    losses = train_losses(task, optax.adam(0.05), jax.random.key(1), 300)
    assert losses[-10:].mean() < 0.25 * losses[:10].mean(), function


def test_regression_fits_its_teacher_and_only_training_targets_are_noisy():
    first = make_task({"family": "regression", "seed": 1, "noise": 0.5})
    second = make_task({"family": "regression", "seed": 2, "activation": "tanh"})
    third = make_task({"family": "regression", "seed": 3, "noise": 0.0})
    # the activation, the noise and the teacher are leaves
    assert first.shape_key == second.shape_key == third.shape_key
    assert not np.allclose(first.teacher[0]["w"], third.teacher[0]["w"])
    key = jax.random.key(0)
    inputs, clean = first.sample_batch(key, "test")
    assert np.allclose(clean, apply_mlp(first.teacher, inputs, jnp.tanh))
    train_inputs, noisy = first.sample_batch(key, "train")
    residual = noisy - apply_mlp(first.teacher, train_inputs, jnp.tanh)
    assert float(jnp.std(residual)) == pytest.approx(0.5, rel=0.1)
    # a student of the teacher's own architecture, given the teacher's weights, has zero loss
    student = make_task({"family": "regression", "seed": 1, "hidden": [32],
                         "activation": "tanh"})
    assert float(student.loss(student.teacher, (inputs, clean))) == pytest.approx(0.0, abs=1e-10)
    assert float(student.loss(student.init(key), (inputs, clean))) > 0.1
    with pytest.raises(ValueError, match="noise must be >= 0"):
        make_task({"family": "regression", "noise": -1.0})


#: Configurations that differ only in fields that are leaves (data sets of one image side,
#: activations, test functions, noise, seeds, scales): each group is one shape.
BUCKETS = {
    "mlp": [{"family": "mlp", "seed": seed, "dataset": dataset, "activation": activation,
             "hidden": [32], "reparam_scale": 10}
            for seed, (dataset, activation) in enumerate(
                (d, a) for d in ("fashion_mnist8", "digits8") for a in ACTIVATIONS)],
    "logistic": [{"family": "logistic", "dataset": d} for d in ("fashion_mnist8", "digits8")],
    "test_function": [{"family": "test_function", "function": f, "noise": noise}
                      for f in TEST_FUNCTIONS for noise in (0.0, 0.1)],
    "regression": [{"family": "regression", "dataset": d, "activation": a}
                   for d in ("fashion_mnist8", "digits8") for a in ("relu", "silu")],
    "autoencoder": [{"family": "autoencoder", "dataset": d, "activation": a}
                    for d in ("fashion_mnist8", "digits8") for a in ("relu", "elu")],
    "convnet": [{"family": "convnet", "activation": a} for a in ACTIVATIONS],
}


@pytest.mark.parametrize("bucket", sorted(BUCKETS))
def test_tasks_of_one_bucket_share_a_shape_and_one_compiled_program(bucket):
    tasks = [make_task(config) for config in BUCKETS[bucket]]
    assert len({task.shape_key for task in tasks}) == 1

    @jax.jit
    def value_and_grad(task, key):
        return jax.value_and_grad(task.loss)(task.init(key), task.sample_batch(key))

    losses = [float(value_and_grad(task, jax.random.key(0))[0]) for task in tasks]
    assert value_and_grad._cache_size() == 1
    assert np.all(np.isfinite(losses)) and len(set(losses)) == len(tasks)  # distinct problems


def numpy_mlp_loss(params, images, labels, activation):
    """Softmax cross-entropy of an MLP, in float64 NumPy."""
    x = np.asarray(images, np.float64).reshape(len(images), -1)
    for i, layer in enumerate(params):
        x = x @ np.asarray(layer["w"], np.float64) + np.asarray(layer["b"], np.float64)
        if i < len(params) - 1:
            x = activation(x)
    x = x - x.max(axis=1, keepdims=True)
    log_probs = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(labels)), np.asarray(labels)].mean()


NUMPY_ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
    "gelu": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x / (1 + np.exp(-x)),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
}


@pytest.mark.parametrize("dataset", ["fashion_mnist8", "digits8"])
def test_a_merged_mlp_is_its_data_set_and_activation(dataset):
    # Independent truth: batches indexed from the unpadded data set with the same random row
    # indices, and the loss of each activation computed by NumPy.
    raw = load_images(dataset)
    key = jax.random.key(5)
    for activation, numpy_activation in NUMPY_ACTIVATIONS.items():
        task = make_task({"family": "mlp", "dataset": dataset, "hidden": [5, 3],
                          "activation": activation, "batch_size": 6})
        for split, (images, labels) in (("train", raw[:2]), ("test", raw[2:])):
            index = np.asarray(jax.random.randint(key, (6,), 0, len(images)))
            batch = task.sample_batch(key, split)
            np.testing.assert_allclose(batch[0], images[index] / 255.0, rtol=1e-6)
            np.testing.assert_array_equal(batch[1], labels[index])
            params = task.init(jax.random.key(1))
            expected = numpy_mlp_loss(params, *batch, numpy_activation)
            assert float(task.loss(params, batch)) == pytest.approx(expected, rel=1e-5)
    # a large batch of the small data set draws from all of it and never from the padding
    task = make_task({"family": "logistic", "dataset": dataset, "batch_size": 4096})
    images, _ = task.sample_batch(jax.random.key(2), "test")
    rows = {row.tobytes() for row in raw.test_images}
    drawn = {row.tobytes() for row in np.asarray(images * 255.0).round().astype(np.uint8)}
    assert drawn <= rows and len(drawn) > 0.25 * min(len(rows), 4096)


#: name -> (a point, the function's value there by hand); every minimum value is 0.
CLOSED_FORMS = {
    "rosenbrock": ((0.0, 0.0), 1.0),
    "beale": ((0.0, 0.0), 1.5**2 + 2.25**2 + 2.625**2),
    "booth": ((0.0, 0.0), 7.0**2 + 5.0**2),
    "himmelblau": ((0.0, 0.0), 11.0**2 + 7.0**2),
    "matyas": ((1.0, 2.0), 0.26 * 5.0 - 0.48 * 2.0),
    "three_hump_camel": ((1.0, 1.0), 2.0 - 1.05 + 1.0 / 6.0 + 1.0 + 1.0),
}
MINIMA = {"rosenbrock": (1.0, 1.0), "beale": (3.0, 0.5), "booth": (1.0, 3.0),
          "himmelblau": (3.0, 2.0), "matyas": (0.0, 0.0), "three_hump_camel": (0.0, 0.0)}


def test_test_functions_share_one_program_and_keep_their_closed_forms():
    assert set(CLOSED_FORMS) == set(MINIMA) == set(TEST_FUNCTIONS)

    @jax.jit
    def value_and_grad(task, params):
        return jax.value_and_grad(task.loss)(params, task.sample_batch(jax.random.key(0), "test"))

    for name, (point, value) in CLOSED_FORMS.items():
        task = make_task({"family": "test_function", "function": name, "init_scale": 0.5})
        loss, _ = value_and_grad(task, jnp.asarray(point))
        assert float(loss) == pytest.approx(value, rel=1e-6), name
        loss, grad = value_and_grad(task, jnp.asarray(MINIMA[name]))
        assert float(loss) == pytest.approx(0.0, abs=1e-6) and np.allclose(grad, 0, atol=1e-4)
        noise = jax.random.normal(jax.random.key(3), (2,))
        np.testing.assert_allclose(task.init(jax.random.key(3)),
                                   np.asarray(TEST_FUNCTIONS[name][1]) + 0.5 * noise, rtol=1e-6)
    assert value_and_grad._cache_size() == 1


def test_quadratics_share_code_but_not_matrices():
    first = make_task({"family": "quadratic", "seed": 1, "dim": 8, "log_condition": 3.0})
    second = make_task({"family": "quadratic", "seed": 2, "dim": 8, "noise": 0.0})
    assert first.shape_key == second.shape_key
    assert not np.allclose(first.matrix, second.matrix)
    eigenvalues = np.linalg.eigvalsh(np.asarray(first.matrix, np.float64))
    assert eigenvalues.max() / eigenvalues.min() == pytest.approx(1e3, rel=1e-3)

    traces = []

    @jax.jit
    def loss(task, key):
        traces.append(task)
        return init_and_loss(task, key)

    loss(first, jax.random.key(0))
    loss(second, jax.random.key(0))
    assert len(traces) == 1  # the second quadratic reused the first one's compiled code


def test_quadratic_noise_leaves_expected_loss_unchanged():
    task = make_task({"family": "quadratic", "seed": 5, "dim": 8, "noise": 0.5})
    params = task.init(jax.random.key(0))
    exact = task.loss(params, task.sample_batch(jax.random.key(1), "test"))
    expected = 0.5 * (params - task.target) @ task.matrix @ (params - task.target)
    assert exact == pytest.approx(float(expected), rel=1e-5)
    batches = jax.vmap(task.sample_batch)(jax.random.split(jax.random.key(2), 20_000))
    noisy = jax.vmap(task.loss, in_axes=(None, 0))(params, batches)
    assert noisy.std() > 0.1 * exact
    assert noisy.mean() == pytest.approx(float(exact), abs=4 * float(noisy.std()) / np.sqrt(20_000))


def test_lopt_training_loss_is_the_small_optimizers_unrolled_meta_loss():
    task = make_task({"family": "lopt_training", "noise": 0.5, "unroll": 6, "inner_dim": 5})
    theta = task.init(jax.random.key(0))
    batch = task.sample_batch(jax.random.key(1))
    # Independent truth: the small learned optimizer through optax, one Python step at a time.
    opt = as_optax(task.small_lopt, theta)
    c, target = np.asarray(batch["curvature"]), np.asarray(batch["target"])
    w = batch["start"]
    state, losses = opt.init(w), []
    for noise in batch["noise"]:
        update, state = opt.update(c * (w - target) + noise, state, w)
        w = optax.apply_updates(w, update)
        losses.append(0.5 * np.sum(c * (np.asarray(w) - target) ** 2))
    start = 0.5 * np.sum(c * (np.asarray(batch["start"]) - target) ** 2)
    assert float(task.loss(theta, batch)) == pytest.approx(np.mean(losses) / start, rel=1e-5)
    assert 0.01 <= c.min() and c.max() <= 1.0
    assert task.small_lopt.step_mult == 0.1  # 100x the default: it moves the inner problem
    # zero weights take no steps: the loss is exactly 1
    assert float(task.loss(jax.tree.map(jnp.zeros_like, theta), batch)) == pytest.approx(1.0)
    # the gradient is the loss's: a central difference along a random direction
    direction = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape), theta)
    eps = 1e-2
    shifted = [task.loss(jax.tree.map(lambda x, d: x + s * eps * d, theta, direction), batch)
               for s in (1, -1)]
    grad = jax.grad(task.loss)(theta, batch)
    along = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad),
                                                       jax.tree.leaves(direction)))
    assert along == pytest.approx(float(shifted[0] - shifted[1]) / (2 * eps), rel=0.05)
    # test batches have no gradient noise; training batches have the configured spread
    assert not np.any(task.sample_batch(jax.random.key(1), "test")["noise"])
    assert float(jnp.std(batch["noise"])) == pytest.approx(0.5, rel=0.35)
    for field, bad in (("unroll", 0), ("inner_dim", 2.5), ("hidden", []), ("hidden", 8),
                       ("hidden", [True]), ("noise", -1.0), ("noise", "0.1")):
        with pytest.raises(ValueError, match=field):
            make_task({"family": "lopt_training", field: bad})


@pytest.mark.parametrize("family", ["logistic", "mlp"])
def test_a_padded_batch_is_the_unpadded_batch_and_shares_code_across_sizes(family):
    # Independent truth: the unpadded task of the same batch size on the first rows.
    plain = make_task({"family": family, "batch_size": 24})
    padded = make_task({"family": family, "batch_size": 24, "pad_batch_to": 64})
    params = plain.init(jax.random.key(0))
    images, labels = padded.sample_batch(jax.random.key(1))
    assert images.shape[0] == 64
    value, grad = jax.value_and_grad(padded.loss)(params, (images, labels))
    expected, expected_grad = jax.value_and_grad(plain.loss)(params, (images[:24], labels[:24]))
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(expected_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    # every batch size padded to 64 is one shape (one compilation); unpadded sizes are not
    sizes = (8, 24, 64)
    assert len({make_task({"family": family, "batch_size": b, "pad_batch_to": 64}).shape_key
                for b in sizes}) == 1
    assert len({make_task({"family": family, "batch_size": b}).shape_key for b in sizes}) == 3
    for bad in (16, -1, 2.0):
        with pytest.raises(ValueError, match="pad_batch_to must be 0"):
            make_task({"family": family, "batch_size": 24, "pad_batch_to": bad})


def test_make_task_rejects_unknown_names_and_bad_values():
    with pytest.raises(ValueError, match="unknown task family 'resnet'.*'quadratic'"):
        make_task({"family": "resnet"})
    with pytest.raises(ValueError, match="unknown field.*'width'.*'hidden'"):
        make_task({"family": "mlp", "width": 32})
    with pytest.raises(ValueError, match="activation"):
        make_task({"family": "mlp", "activation": "sine"})
    with pytest.raises(ValueError, match="dim"):
        make_task({"family": "quadratic", "dim": 0})
    with pytest.raises(ValueError, match="seed"):
        make_task({"family": "quadratic", "seed": -1})
    with pytest.raises(ValueError, match="split"):
        make_task({"family": "logistic"}).sample_batch(jax.random.key(0), "valid")


def test_heldout_is_disjoint_from_training_samples():
    distribution = TaskDistribution(TRAIN_FAMILIES, grid="full")
    samples = [distribution.sample(seed) for seed in range(3000)]
    heldout = distribution.heldout()
    canonical = {json.dumps(config, sort_keys=True) for config in samples}
    assert not canonical & {json.dumps(config, sort_keys=True) for config in heldout}
    assert max(config["seed"] for config in samples) < HELDOUT_SEED_START
    assert min(config["seed"] for config in heldout) >= HELDOUT_SEED_START
    sampled_families = {config["family"] for config in samples}
    assert set(HELDOUT_FAMILIES) <= {config["family"] for config in heldout} - sampled_families
    assert sampled_families == set(FAMILIES) - set(HELDOUT_FAMILIES)
    for config in heldout:
        make_task(json.loads(json.dumps(config)))  # JSON round trip builds


def shapes_of(distribution, draws=2000):
    configs = {json.dumps({**distribution.sample(seed), "seed": 0}, sort_keys=True)
               for seed in range(draws)}
    return {make_task(json.loads(config)).shape_key for config in configs}


def test_the_full_training_distribution_has_36_shapes():
    assert len(shapes_of(TaskDistribution(TRAIN_FAMILIES, grid="full"))) == 36


def test_the_compact_grid_keeps_the_variety_but_has_6_shapes_for_the_default_families():
    compact = TaskDistribution(DEFAULT_FAMILIES, grid="compact")
    full = TaskDistribution(DEFAULT_FAMILIES, grid="full")
    assert len(shapes_of(compact)) == 6 < len(shapes_of(full))
    samples = [compact.sample(seed) for seed in range(500)]
    # every compact draw is one the full grid can make, and none is a held-out configuration
    for config in samples:
        for field, value in config.items():
            if field in TRAIN_GRIDS[config["family"]]:
                grid_values = [list(v) if isinstance(v, tuple) else v
                               for v in TRAIN_GRIDS[config["family"]][field]]
                assert value in grid_values, (field, value)
    heldout = {json.dumps(c, sort_keys=True) for c in compact.heldout()}
    assert not heldout & {json.dumps(c, sort_keys=True) for c in samples}
    # what varies without a new shape still varies
    assert len({c["log_condition"] for c in samples if c["family"] == "quadratic"}) == 4
    assert len({c["function"] for c in samples if c["family"] == "test_function"}) == 5
    assert len({c["activation"] for c in samples if c["family"] == "mlp"}) == 2
    with pytest.raises(ValueError, match="grid must be one of"):
        TaskDistribution(grid="tiny")


def test_restricted_distribution_and_keys():
    distribution = TaskDistribution(families=["quadratic", "mlp"])
    assert {distribution.sample(seed)["family"] for seed in range(200)} == {"quadratic", "mlp"}
    assert distribution.sample(jax.random.key(4)) == distribution.sample(jax.random.key(4))
    assert distribution.sample(7) == distribution.sample(7)
    with pytest.raises(ValueError, match="'autoencoder' is held out"):
        TaskDistribution(families=("autoencoder",))
    with pytest.raises(ValueError, match="unknown task family 'vae'"):
        TaskDistribution(families=("quadratic", "vae"))
