"""ES and PES meta-gradients against exact gradients from ``jax.grad`` through the unroll."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfopt.estimators import PES, ConstantLength, TruncatedES, unroll
from selfopt.estimators.inner_problem import new_inner_state
from selfopt.lopt import LearnedSGD, MLPLOpt
from selfopt.tasks.base import Task, task_dataclass


@task_dataclass
class DeterministicQuadratic(Task):
    """0.5 * sum(scales * w^2) from a fixed start: no noise, so the meta-loss is a function."""

    scales: jax.Array
    family = "test_quadratic"

    def init(self, key):
        return {"w": jnp.ones_like(self.scales) + 0.0 * jax.random.normal(key, self.scales.shape)}

    def sample_batch(self, key, split="train"):
        return jnp.zeros(())

    def loss(self, params, batch):
        return 0.5 * jnp.sum(self.scales * params["w"] ** 2) + batch


QUAD = DeterministicQuadratic(scales=jnp.array([0.5, 1.0, 2.0]))


def cosine(a, b):
    a, b = jax.flatten_util.ravel_pytree(a)[0], jax.flatten_util.ravel_pytree(b)[0]
    return float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def shared_problem_state(estimator, theta, num_pairs, length):
    """``num_pairs`` copies of one inner problem (same init, same batches) at step 0."""
    one = new_inner_state(estimator.lopt, theta, QUAD, jax.random.key(0), ConstantLength(length))
    return jax.tree.map(lambda x: jnp.repeat(x[None], num_pairs, axis=0), one)


def exact_truncation_grad(estimator, theta, length):
    """jax.grad of the first truncation's meta-loss of the shared problem."""
    def meta_loss(th):
        state = new_inner_state(estimator.lopt, th, QUAD, jax.random.key(0), ConstantLength(length))
        return unroll(estimator.lopt, th, QUAD, state, estimator.truncation_length)[1]
    return jax.grad(meta_loss)(theta)


def test_es_matches_jax_grad_for_mlp_lopt():
    lopt = MLPLOpt(hidden=(8,), step_mult=0.1)  # 202 weights, steps large enough to matter
    theta = lopt.init(jax.random.key(1))
    es = TruncatedES(lopt, num_pairs=4096, truncation_length=5)
    state = shared_problem_state(es, theta, es.num_pairs, length=100)
    estimate, _ = jax.jit(es.estimate)(QUAD, theta, 1e-3, state, jax.random.key(2))
    exact = exact_truncation_grad(es, theta, length=100)
    assert cosine(estimate.grad, exact) >= 0.9
    # With few pairs the estimate is noisy: the test can tell a good estimate from a poor one.
    few = TruncatedES(lopt, num_pairs=8, truncation_length=5)
    rough, _ = jax.jit(few.estimate)(QUAD, theta, 1e-3, jax.tree.map(lambda x: x[:8], state),
                                     jax.random.key(2))
    assert cosine(rough.grad, exact) < 0.7


def test_es_matches_jax_grad_for_learned_step_size():
    lopt = LearnedSGD(init_log_lr=float(np.log(0.1)))
    theta = lopt.init(None)
    es = TruncatedES(lopt, num_pairs=8192, truncation_length=10)
    state = shared_problem_state(es, theta, es.num_pairs, length=100)
    estimate, _ = jax.jit(es.estimate)(QUAD, theta, 1e-3, state, jax.random.key(3))
    exact = exact_truncation_grad(es, theta, length=100)
    np.testing.assert_allclose(estimate.grad["log_lr"], exact["log_lr"], rtol=0.05)


def test_final_meta_loss_es_matches_jax_grad_of_the_last_steps():
    # meta_loss="final" averages the truncation's last 10% (here its last 2 of 20 steps): the
    # estimate follows jax.grad of exactly that, which differs from the mean over all steps.
    lopt = LearnedSGD(init_log_lr=float(np.log(0.1)))
    theta = lopt.init(None)
    es = TruncatedES(lopt, num_pairs=8192, truncation_length=20, meta_loss="final")
    state = shared_problem_state(es, theta, es.num_pairs, length=100)
    estimate, _ = jax.jit(es.estimate)(QUAD, theta, 1e-3, state, jax.random.key(3))

    def last_steps_loss(th, tail):  # the mean over the last `tail` steps, by two plain unrolls
        state = new_inner_state(lopt, th, QUAD, jax.random.key(0), ConstantLength(100))
        if tail < 20:
            state, _ = unroll(lopt, th, QUAD, state, 20 - tail)
        return unroll(lopt, th, QUAD, state, tail)[1]

    final, mean = (float(jax.grad(last_steps_loss)(theta, tail)["log_lr"]) for tail in (2, 20))
    np.testing.assert_allclose(estimate.grad["log_lr"], final, rtol=0.05)
    assert abs(final - mean) > 0.2 * abs(final)
    with pytest.raises(ValueError, match="meta_loss"):
        TruncatedES(lopt, meta_loss="last")


def run_whole_problem(estimator, theta, num_pairs, num_truncations, sigma=1e-3):
    """Sums an estimator's estimates over every truncation of one shared inner problem."""
    length = num_truncations * estimator.truncation_length
    inner = shared_problem_state(estimator, theta, num_pairs, length)
    state = estimator.init_state(QUAD, theta, jax.random.key(0))
    state = inner if isinstance(estimator, TruncatedES) and not isinstance(estimator, PES) else \
        state._replace(pos=inner, neg=inner)
    step = jax.jit(estimator.estimate)
    total = 0.0
    for t in range(num_truncations):
        est, state = step(QUAD, theta, sigma, state, jax.random.key(10 + t))
        total += est.grad["log_lr"]
    return float(total)


def exact_whole_problem_grad(lopt, theta, truncation_length, num_truncations):
    """jax.grad of the sum over truncations of their meta-losses, through the whole unroll."""
    def total_meta_loss(th):
        length = num_truncations * truncation_length
        state = new_inner_state(lopt, th, QUAD, jax.random.key(0), ConstantLength(length))
        losses = []
        for _ in range(num_truncations):
            state, loss = unroll(lopt, th, QUAD, state, truncation_length)
            losses.append(loss)
        return sum(losses)
    return float(jax.grad(total_meta_loss)(theta)["log_lr"])


def test_pes_is_unbiased_where_truncated_es_is_biased():
    # A learned step size on a quadratic, trained over 8 truncations of 2 steps. The step size
    # chosen early shapes every later truncation's start; truncated ES cannot see that.
    lopt = LearnedSGD(init_log_lr=float(np.log(0.05)))
    theta = lopt.init(None)
    kwargs = dict(num_pairs=8192, truncation_length=2)
    exact = exact_whole_problem_grad(lopt, theta, 2, 8)
    pes = run_whole_problem(PES(lopt, **kwargs), theta, 8192, 8)
    tes = run_whole_problem(TruncatedES(lopt, **kwargs), theta, 8192, 8)
    assert abs(pes - exact) / abs(exact) < 0.1, (pes, exact)
    assert abs(tes - exact) / abs(exact) > 0.5, (tes, exact)


def test_diverging_unroll_gives_capped_loss_and_finite_estimate():
    lopt = LearnedSGD(init_log_lr=float(np.log(50.0)))  # lr 50 on curvature 2: blows up
    theta = lopt.init(None)
    es = TruncatedES(lopt, num_pairs=4, truncation_length=50, loss_cap=10.0)
    state = shared_problem_state(es, theta, 4, length=100)
    estimate, state = jax.jit(es.estimate)(QUAD, theta, 1e-2, state, jax.random.key(0))
    assert bool(jnp.all(jnp.isfinite(jax.flatten_util.ravel_pytree(estimate.grad)[0])))
    assert np.isfinite(float(estimate.meta_loss)) and float(estimate.meta_loss) <= 10.0
    assert bool(jnp.all(state.diverged))
    # The diverged problems restart at the next truncation with fresh, finite parameters.
    _, state = jax.jit(es.estimate)(QUAD, theta, 1e-2, state, jax.random.key(1))
    assert int(state.step[0]) == 50


def test_inner_problems_persist_and_restart_at_their_length():
    lopt = MLPLOpt()
    theta = lopt.init(jax.random.key(0))
    es = TruncatedES(lopt, num_pairs=3, truncation_length=10, schedule=ConstantLength(30))
    state = es.init_state(QUAD, theta, jax.random.key(0))
    start = np.asarray(state.step)
    assert set(start) <= {0, 10, 20}  # staggered on truncation boundaries
    step = jax.jit(es.estimate)
    for i in range(4):
        _, state = step(QUAD, theta, 0.01, state, jax.random.key(i))
    # Each problem ran 4 truncations, restarting (at step 0) whenever it had reached 30 steps.
    expected = []
    for s in start:
        for _ in range(4):
            s = (0 if s >= 30 else s) + 10
        expected.append(s)
    np.testing.assert_array_equal(np.asarray(state.step), expected)


def test_population_vmaps_over_members():
    lopt = MLPLOpt()
    thetas = jax.vmap(lopt.init)(jax.random.split(jax.random.key(0), 3))
    es = PES(lopt, num_pairs=2, truncation_length=5)
    states = jax.vmap(lambda th, k: es.init_state(QUAD, th, k))(
        thetas, jax.random.split(jax.random.key(1), 3))
    sigmas = jnp.array([0.01, 0.02, 0.03])
    estimates, states = jax.jit(jax.vmap(es.estimate, in_axes=(None, 0, 0, 0, 0)))(
        QUAD, thetas, sigmas, states, jax.random.split(jax.random.key(2), 3))
    assert estimates.grad["layers"][0]["w"].shape == (3, *thetas["layers"][0]["w"].shape[1:])
    assert estimates.meta_loss.shape == (3,)


def test_partial_sums_of_shards_combine_to_the_full_estimate():
    lopt = MLPLOpt(hidden=(8,))
    theta = lopt.init(jax.random.key(0))
    es = TruncatedES(lopt, num_pairs=4, truncation_length=5)
    state = es.init_state(QUAD, theta, jax.random.key(1))
    keys = jax.random.split(jax.random.key(2), 4)
    partial_sums = jax.jit(es.partial_sums)
    full, full_state = partial_sums(QUAD, theta, 0.01, state, keys)
    shard = lambda tree, sl: jax.tree.map(lambda x: x[sl], tree)
    a, a_state = partial_sums(QUAD, theta, 0.01, shard(state, slice(0, 1)), keys[:1])
    b, b_state = partial_sums(QUAD, theta, 0.01, shard(state, slice(1, 4)), keys[1:])
    combined = jax.tree.map(jnp.add, a, b)
    assert float(combined.count) == 4.0
    for x, y in zip(jax.tree.leaves(combined), jax.tree.leaves(full)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b_state.params["w"], shard(full_state, slice(1, 4)).params["w"])


def test_a_test_split_meta_loss_scores_the_same_training_on_test_batches():
    from selfopt.estimators.inner_problem import normalized_loss
    from selfopt.tasks import make_task
    task = make_task({"family": "logistic", "dataset": "digits8", "batch_size": 32})
    lopt = MLPLOpt(hidden=(8,))
    theta = lopt.init(jax.random.key(3))
    state = new_inner_state(lopt, theta, task, jax.random.key(4), ConstantLength(50))
    ends, meta = {}, {}
    for split in ("train", "test"):
        ends[split], meta[split] = unroll(lopt, theta, task, state, 6, "log", 10.0, None, split)
    # the split changes only what is measured, not the training
    same = lambda a, b: np.testing.assert_array_equal(*(
        jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        for x in (a, b)))
    jax.tree.map(same, ends["train"], ends["test"])
    # reference: the same six steps one at a time, each step's parameters scored on a test batch
    opt, params, opt_state, terms = lopt.optimizer(theta), state.params, state.opt_state, []
    for t in range(6):
        key = jax.random.fold_in(state.data_key, t)
        loss, grads = jax.value_and_grad(task.loss)(params, task.sample_batch(key))
        test_loss = task.loss(params, task.sample_batch(jax.random.fold_in(key, 1), "test"))
        terms.append(normalized_loss(task, test_loss, state.init_loss, "log", 10.0))
        updates, opt_state = opt.update(grads, opt_state, params, loss=loss)
        params = jax.tree.map(jnp.add, params, updates)
    np.testing.assert_allclose(meta["test"], np.mean(terms), rtol=1e-5)
    assert abs(float(meta["test"]) - float(meta["train"])) > 1e-4
    with pytest.raises(ValueError, match="split"):
        unroll(lopt, theta, task, state, 2, split="valid")
    with pytest.raises(ValueError, match="meta_split"):
        TruncatedES(lopt, meta_split="validation")


@pytest.mark.parametrize("log_floor", [1e-6, 1e-12])
def test_the_log_floor_bounds_what_precision_earns(log_floor):
    # SGD at rate 1 on 0.5 * w^2 (unit curvatures) reaches the minimum exactly in one step: the
    # log meta-loss of a 5-step truncation is (log 1 + 4 log(floor)) / 5.
    quad = DeterministicQuadratic(scales=jnp.ones(3))
    lopt = LearnedSGD(init_log_lr=0.0)
    es = TruncatedES(lopt, num_pairs=1, truncation_length=5, normalization="log",
                     log_floor=log_floor)
    theta = lopt.init(jax.random.key(0))
    state = jax.tree.map(lambda x: x[None], new_inner_state(lopt, theta, quad, jax.random.key(0),
                                                            ConstantLength(100)))
    (loss_pos, loss_neg), _ = es.unroll_pairs(quad, theta, 0.0, jax.tree.map(
        lambda x: x[None], theta), state, state)
    np.testing.assert_allclose([loss_pos[0], loss_neg[0]], 4 * np.log(log_floor) / 5, rtol=1e-5)
