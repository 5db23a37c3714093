"""ES and PES meta-gradients against exact gradients from ``jax.grad`` through the unroll."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfopt.estimators import PES, ConstantLength, LogUniformLength, TruncatedES, unroll
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


def shared_problem_state(lopt, theta, num_pairs, length):
    """``num_pairs`` copies of one inner problem (same init, same batches) at step 0."""
    one = new_inner_state(lopt, theta, QUAD, jax.random.key(0), ConstantLength(length))
    return jax.tree.map(lambda x: jnp.repeat(x[None], num_pairs, axis=0), one)


def exact_truncation_grad(estimator, lopt, theta, length):
    """jax.grad of the first truncation's meta-loss of the shared problem (normalised as the
    estimator normalises it)."""
    def meta_loss(th):
        state = new_inner_state(lopt, th, QUAD, jax.random.key(0), ConstantLength(length))
        return unroll(lopt, th, QUAD, state, estimator.truncation_length,
                      estimator.normalization, estimator.loss_cap,
                      log_floor=estimator.log_floor)[1]
    return jax.grad(meta_loss)(theta)


def jit_estimate(estimator):
    """``estimator.estimate`` compiled, the learned-optimizer architecture static."""
    return jax.jit(estimator.estimate, static_argnums=0)


def test_es_matches_jax_grad_for_mlp_lopt():
    lopt = MLPLOpt(hidden=(8,), step_mult=0.1)  # 202 weights, steps large enough to matter
    theta = lopt.init(jax.random.key(1))
    es = TruncatedES(num_pairs=4096, truncation_length=5, normalization="ratio")
    state = shared_problem_state(lopt, theta, es.num_pairs, length=100)
    estimate, _ = jit_estimate(es)(lopt, QUAD, theta, 1e-3, state, jax.random.key(2))
    exact = exact_truncation_grad(es, lopt, theta, length=100)
    assert cosine(estimate.grad, exact) >= 0.9
    # With few pairs the estimate is noisy: the test can tell a good estimate from a poor one.
    few = TruncatedES(num_pairs=8, truncation_length=5, normalization="ratio")
    rough, _ = jit_estimate(few)(lopt, QUAD, theta, 1e-3, jax.tree.map(lambda x: x[:8], state),
                                 jax.random.key(2))
    assert cosine(rough.grad, exact) < 0.7


@pytest.mark.parametrize("normalization", ["ratio", "log"])
def test_es_matches_jax_grad_for_learned_step_size(normalization):
    lopt = LearnedSGD(init_log_lr=float(np.log(0.1)))
    theta = lopt.init(None)
    es = TruncatedES(num_pairs=4096, truncation_length=10, normalization=normalization)
    state = shared_problem_state(lopt, theta, es.num_pairs, length=100)
    # two independent estimates from the same state: together, one of 8192 pairs
    step = jit_estimate(es)
    grads = [step(lopt, QUAD, theta, 1e-3, state, jax.random.key(k))[0].grad["log_lr"]
             for k in (3, 4)]
    exact = exact_truncation_grad(es, lopt, theta, length=100)
    np.testing.assert_allclose(np.mean(grads), exact["log_lr"], rtol=0.05)


def run_whole_problem(estimator, lopt, theta, num_pairs, num_truncations, sigma=1e-3):
    """Sums an estimator's estimates over every truncation of one shared inner problem."""
    length = num_truncations * estimator.truncation_length
    inner = shared_problem_state(lopt, theta, num_pairs, length)
    state = estimator.init_state(lopt, QUAD, theta, jax.random.key(0))
    state = inner if estimator.kind == "es" else state._replace(pos=inner, neg=inner)
    step = jit_estimate(estimator)
    total = 0.0
    for t in range(num_truncations):
        est, state = step(lopt, QUAD, theta, sigma, state, jax.random.key(10 + t))
        total += est.grad["log_lr"]
    return float(total)


def exact_whole_problem_grad(lopt, theta, truncation_length, num_truncations):
    """jax.grad of the sum over truncations of their meta-losses, through the whole unroll."""
    def total_meta_loss(th):
        length = num_truncations * truncation_length
        state = new_inner_state(lopt, th, QUAD, jax.random.key(0), ConstantLength(length))
        losses = []
        for _ in range(num_truncations):
            state, loss = unroll(lopt, th, QUAD, state, truncation_length, "ratio")
            losses.append(loss)
        return sum(losses)
    return float(jax.grad(total_meta_loss)(theta)["log_lr"])


def test_pes_is_unbiased_where_truncated_es_is_biased():
    # A learned step size on a quadratic, trained over 8 truncations of 2 steps. The step size
    # chosen early shapes every later truncation's start; truncated ES cannot see that.
    lopt = LearnedSGD(init_log_lr=float(np.log(0.05)))
    theta = lopt.init(None)
    kwargs = dict(num_pairs=4096, truncation_length=2, normalization="ratio")
    exact = exact_whole_problem_grad(lopt, theta, 2, 8)
    pes = run_whole_problem(PES(**kwargs), lopt, theta, 4096, 8)
    tes = run_whole_problem(TruncatedES(**kwargs), lopt, theta, 4096, 8)
    assert abs(pes - exact) / abs(exact) < 0.1, (pes, exact)
    assert abs(tes - exact) / abs(exact) > 0.5, (tes, exact)


def test_diverging_unroll_gives_capped_loss_and_finite_estimate():
    lopt = LearnedSGD(init_log_lr=float(np.log(50.0)))  # lr 50 on curvature 2: blows up
    theta = lopt.init(None)
    es = TruncatedES(num_pairs=4, truncation_length=50, loss_cap=10.0)  # log normalisation
    state = shared_problem_state(lopt, theta, 4, length=100)
    estimate, state = jit_estimate(es)(lopt, QUAD, theta, 1e-2, state, jax.random.key(0))
    assert bool(jnp.all(jnp.isfinite(jax.flatten_util.ravel_pytree(estimate.grad)[0])))
    assert np.isfinite(float(estimate.meta_loss)) and float(estimate.meta_loss) <= np.log(10.0)
    assert bool(jnp.all(state.diverged))
    # The diverged problems restart at the next truncation with fresh, finite parameters.
    _, state = jit_estimate(es)(lopt, QUAD, theta, 1e-2, state, jax.random.key(1))
    assert int(state.step[0]) == 50


def test_inner_problems_persist_and_restart_at_their_length():
    lopt = MLPLOpt()
    theta = lopt.init(jax.random.key(0))
    # min == max: every problem is 30 steps long
    es = TruncatedES(num_pairs=3, truncation_length=10, min_inner_length=30,
                     max_inner_length=30)
    state = es.init_state(lopt, QUAD, theta, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(state.length), [30, 30, 30])
    start = np.asarray(state.step)
    assert set(start) <= {0, 10, 20}  # staggered on truncation boundaries
    step = jit_estimate(es)
    for i in range(4):
        _, state = step(lopt, QUAD, theta, 0.01, state, jax.random.key(i))
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
    es = PES(num_pairs=2, truncation_length=5)
    # as the training loop maps them: the architecture and the task shared by all members
    states = jax.vmap(es.init_state, in_axes=(None, None, 0, 0))(
        lopt, QUAD, thetas, jax.random.split(jax.random.key(1), 3))
    sigmas = jnp.array([0.01, 0.02, 0.03])
    estimates, states = jax.jit(jax.vmap(es.estimate, in_axes=(None, None, 0, 0, 0, 0)),
                                static_argnums=0)(
        lopt, QUAD, thetas, sigmas, states, jax.random.split(jax.random.key(2), 3))
    assert estimates.grad["layers"][0]["w"].shape == (3, *thetas["layers"][0]["w"].shape[1:])
    assert estimates.meta_loss.shape == (3,)


def test_partial_sums_of_shards_combine_to_the_full_estimate():
    lopt = MLPLOpt(hidden=(8,))
    theta = lopt.init(jax.random.key(0))
    es = TruncatedES(num_pairs=4, truncation_length=5)
    state = es.init_state(lopt, QUAD, theta, jax.random.key(1))
    keys = jax.random.split(jax.random.key(2), 4)
    partial_sums = jax.jit(es.partial_sums, static_argnums=0)
    full, full_state = partial_sums(lopt, QUAD, theta, 0.01, state, keys)
    shard = lambda tree, sl: jax.tree.map(lambda x: x[sl], tree)
    a, a_state = partial_sums(lopt, QUAD, theta, 0.01, shard(state, slice(0, 1)), keys[:1])
    b, b_state = partial_sums(lopt, QUAD, theta, 0.01, shard(state, slice(1, 4)), keys[1:])
    combined = jax.tree.map(jnp.add, a, b)
    assert float(combined.count) == 4.0
    for x, y in zip(jax.tree.leaves(combined), jax.tree.leaves(full)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b_state.params["w"], shard(full_state, slice(1, 4)).params["w"])


@pytest.mark.parametrize("tail", [None, 2])
def test_unroll_meta_loss_is_the_mean_log_ratio_of_the_training_losses(tail):
    # reference: the same six steps one at a time, each step's training loss (before its
    # update) normalised by hand with NumPy, log(clip(loss / init_loss, floor, cap))
    from selfopt.tasks import make_task
    task = make_task({"family": "logistic", "dataset": "digits8", "batch_size": 32})
    lopt = MLPLOpt(hidden=(8,))
    theta = lopt.init(jax.random.key(3))
    state = new_inner_state(lopt, theta, task, jax.random.key(4), ConstantLength(50))
    end, meta = unroll(lopt, theta, task, state, 6, "log", 10.0, tail)
    opt, params, opt_state, terms = lopt.optimizer(theta), state.params, state.opt_state, []
    for t in range(6):
        key = jax.random.fold_in(state.data_key, t)
        loss, grads = jax.value_and_grad(task.loss)(params, task.sample_batch(key))
        ratio = float(task.normalize(loss, state.init_loss))
        terms.append(np.log(max(min(ratio, 10.0), 1e-6)))
        updates, opt_state = opt.update(grads, opt_state, params, loss=loss)
        params = jax.tree.map(jnp.add, params, updates)
    np.testing.assert_allclose(meta, np.mean(terms if tail is None else terms[-tail:]),
                               rtol=1e-5)
    assert int(end.step) == 6
    for got, want in zip(jax.tree.leaves(end.params), jax.tree.leaves(params)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("log_floor", [1e-6, 1e-12])
def test_the_log_floor_bounds_what_precision_earns(log_floor):
    # SGD at rate 1 on 0.5 * w^2 (unit curvatures) reaches the minimum exactly in one step: the
    # log meta-loss of a 5-step truncation is (log 1 + 4 log(floor)) / 5.
    quad = DeterministicQuadratic(scales=jnp.ones(3))
    lopt = LearnedSGD(init_log_lr=0.0)
    es = TruncatedES(num_pairs=1, truncation_length=5, normalization="log",
                     log_floor=log_floor)
    theta = lopt.init(jax.random.key(0))
    state = jax.tree.map(lambda x: x[None], new_inner_state(lopt, theta, quad, jax.random.key(0),
                                                            ConstantLength(100)))
    (loss_pos, loss_neg), _ = es.unroll_pairs(lopt, quad, theta, 0.0, jax.tree.map(
        lambda x: x[None], theta), state, state)
    np.testing.assert_allclose([loss_pos[0], loss_neg[0]], 4 * np.log(log_floor) / 5, rtol=1e-5)


def test_defaults_kinds_and_the_length_schedule():
    es, pes = TruncatedES(), PES()
    assert (es.kind, pes.kind) == ("es", "pes")
    assert es.normalization == pes.normalization == "log"
    assert es.schedule == LogUniformLength(100, 1000)
    assert TruncatedES(min_inner_length=7, max_inner_length=9).schedule == LogUniformLength(7, 9)
    # min == max: a constant length
    lengths = jax.vmap(TruncatedES(min_inner_length=30, max_inner_length=30).schedule.sample)(
        jax.random.split(jax.random.key(0), 16))
    np.testing.assert_array_equal(lengths, np.full(16, 30))
    # estimators are plain, hashable configuration: no architecture inside
    assert "lopt" not in {f.name for f in dataclasses.fields(PES)}
    assert hash(PES(num_pairs=2)) == hash(PES(num_pairs=2))


@pytest.mark.parametrize("cls", [TruncatedES, PES])
@pytest.mark.parametrize("field,value", [
    ("num_pairs", 0), ("num_pairs", 2.0), ("num_pairs", True), ("truncation_length", 0),
    ("min_inner_length", 0), ("max_inner_length", 99), ("max_inner_length", 10**8),
    ("normalization", "mean"), ("loss_cap", 1.0), ("loss_cap", float("nan")),
    ("log_floor", 0.0), ("log_floor", 0.5),
])
def test_a_bad_field_is_a_one_line_error_that_names_it(cls, field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be .*, got ") as err:
        cls(**{field: value})
    assert "\n" not in str(err.value)
