"""Self-training update by value, PBT exploit/explore and lineage, non-finite replacement."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfopt.lopt import MLPLOpt
from selfopt.population import PBT, AdamControl, Hyperparams, SelfTraining, replace_failed
from selfopt.population.lineage import copy_members
from selfopt.population.self_training import (clip_estimate, clip_threshold, clipped_fraction,
                                               member_rms, scale_and_add)
from selfopt.population.state import PopulationState
from selfopt.train_step import initial_state
from test_lopt import sgd_like_theta
from test_train import tiny

LOPT = MLPLOpt()
#: No key needed by the self and best policies, and a loss each member's LO is given (MLPLOpt
#: ignores it).
KEY, LOSSES = jax.random.key(0), jnp.zeros(2)


def stack(*trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def member(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def grads_for(thetas, seed=0):
    leaves, treedef = jax.tree_util.tree_flatten(thetas)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def expected_sgd_like_update(grad, scale, clip, log_mult):
    """-exp(log_mult) * step_mult * scale * clip(g)/rms(clip(g)) per tensor, clipped to 5, and
    times 3 ** -1.5 (the depth rule: a learned optimizer's weights are three matrices)."""
    assert sum(np.ndim(x) >= 2 for x in jax.tree.leaves(grad)) == 3
    def leaf(g):
        g = np.clip(np.asarray(g), -clip, clip)
        rms = np.sqrt(np.mean(g**2) + 1e-8)
        return -np.exp(log_mult) * LOPT.step_mult * scale * np.clip(g / rms, -5, 5) * 3.0 ** -1.5
    return jax.tree.map(leaf, grad)


def assert_step_equal(got, before, expected):
    """``got - before`` equals ``expected`` up to float32 rounding of the weights (an ulp of a
    weight of 3, ``sgd_like_theta``'s largest, is 2.4e-7: about 1e-4 of a typical step)."""
    np.testing.assert_allclose(np.asarray(got) - np.asarray(before), expected, rtol=1e-4,
                               atol=np.spacing(np.float32(np.max(np.abs(before)))))


def test_self_policy_updates_each_member_with_its_own_optimizer():
    zero = jax.tree.map(jnp.zeros_like, LOPT.init(jax.random.key(0)))
    known = sgd_like_theta(LOPT, scale=3.0)
    thetas = stack(zero, known)
    outer = SelfTraining(policy="self", clip=0.1, clip_relative=False, max_update=0.01)
    grads = grads_for(thetas)
    log_mult = jnp.array([0.5, 0.7])
    new, _, shrink = outer.update(LOPT, thetas, outer.init(LOPT, thetas), grads, log_mult,
                                  jnp.asarray(0), KEY, LOSSES)
    np.testing.assert_array_equal(shrink, [1.0, 1.0])  # both steps within the trust region
    # Member 0's own LO emits zero steps: it does not move, whatever its gradient.
    for a, b in zip(jax.tree.leaves(member(new, 0)), jax.tree.leaves(zero)):
        np.testing.assert_array_equal(a, b)
    # Member 1's own LO is normalised gradient descent: the known update.
    expected = expected_sgd_like_update(member(grads, 1), 3.0, 0.1, 0.7)
    for got, th, exp in zip(jax.tree.leaves(member(new, 1)), jax.tree.leaves(known),
                            jax.tree.leaves(expected)):
        assert_step_equal(got, th, exp)


def test_relative_clip_scales_with_each_members_estimate_where_an_absolute_one_makes_sign_es():
    thetas = stack(LOPT.init(jax.random.key(0)), LOPT.init(jax.random.key(1)))
    # member 0's estimate is exactly 100x member 1's
    one = member(grads_for(thetas), 1)
    grads = stack(jax.tree.map(lambda g: 100.0 * g, one), one)
    rms = np.asarray(member_rms(grads))
    np.testing.assert_allclose(clip_threshold(grads, 2.0, relative=True), 2.0 * rms, rtol=1e-6)
    np.testing.assert_allclose(clip_threshold(grads, 0.1), [0.1, 0.1], rtol=1e-7)
    flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(member(grads, i))]) for i in (0, 1)]
    # relative: the same fraction of each member is clipped (only the tails beyond 2 RMS) ...
    frac = np.asarray(clipped_fraction(grads, clip_threshold(grads, 2.0, relative=True)))
    for i in (0, 1):
        assert frac[i] == pytest.approx(np.mean(np.abs(flat[i]) > 2.0 * rms[i]), abs=1e-6)
    assert 0.01 < frac[0] < 0.1 and frac[0] == pytest.approx(frac[1], abs=1e-6)
    # ... absolute 0.1: nearly all of the large member (sign-ES), a part of the small one
    frac = np.asarray(clipped_fraction(grads, clip_threshold(grads, 0.1)))
    assert frac[0] > 0.99 and frac[1] == pytest.approx(np.mean(np.abs(flat[1]) > 0.1), abs=1e-6)
    clipped = clip_estimate(grads, clip_threshold(grads, 2.0, relative=True))
    for i in (0, 1):
        got = np.concatenate([np.ravel(x) for x in jax.tree.leaves(member(clipped, i))])
        np.testing.assert_allclose(got, np.clip(flat[i], -2.0 * rms[i], 2.0 * rms[i]), rtol=1e-6)


def test_the_self_update_reads_the_relatively_clipped_estimate():
    known = sgd_like_theta(LOPT, scale=3.0)
    thetas = stack(known, known)
    grads = grads_for(thetas)  # RMS 0.3 per weight
    outer = SelfTraining(policy="self", clip=1.0, clip_relative=True, max_update=0.01)
    new, _, _ = outer.update(LOPT, thetas, outer.init(LOPT, thetas), grads, jnp.zeros(2),
                             jnp.asarray(0), KEY, LOSSES)
    # clip at 1 RMS of the member's own estimate: the known update of that clipped estimate
    threshold = float(member_rms(grads)[1])
    expected = expected_sgd_like_update(member(grads, 1), 3.0, threshold, 0.0)
    for got, th, exp in zip(jax.tree.leaves(member(new, 1)), jax.tree.leaves(known),
                            jax.tree.leaves(expected)):
        assert_step_equal(got, th, exp)


def test_best_policy_uses_the_best_members_optimizer_for_everyone():
    zero = jax.tree.map(jnp.zeros_like, LOPT.init(jax.random.key(0)))
    known = sgd_like_theta(LOPT, scale=2.0)
    thetas = stack(zero, known)
    outer = SelfTraining(policy="best", clip=0.1, clip_relative=False, max_update=0.01)
    grads = grads_for(thetas, 1)
    new, _, _ = outer.update(LOPT, thetas, outer.init(LOPT, thetas), grads, jnp.zeros(2),
                             jnp.asarray(1), KEY, LOSSES)
    # The zero member now moves, by member 1's rule applied to its own gradient.
    expected = expected_sgd_like_update(member(grads, 0), 2.0, 0.1, 0.0)
    for got, exp in zip(jax.tree.leaves(member(new, 0)), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-9)
    # With best = 0 (the zero LO) nobody moves.
    still, _, _ = outer.update(LOPT, thetas, outer.init(LOPT, thetas), grads, jnp.zeros(2),
                               jnp.asarray(0), KEY, LOSSES)
    for a, b in zip(jax.tree.leaves(still), jax.tree.leaves(thetas)):
        np.testing.assert_array_equal(a, b)


@dataclasses.dataclass(frozen=True)
class LossScaledSGD:
    """A toy learned optimizer that reads the loss it is given: ``-exp(log_lr) * loss * g``."""

    def init(self, key):
        del key
        return {"log_lr": jnp.zeros(()), "w": jnp.zeros(5)}

    def optimizer(self, theta, num_steps=None):
        del num_steps

        def update(grads, state, params=None, loss=None):
            del params
            return jax.tree.map(lambda g: -jnp.exp(theta["log_lr"]) * loss * g, grads), state

        return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def test_each_member_is_updated_with_its_own_meta_loss_by_the_donors_optimizer():
    # best = 1: both members are updated by member 1's rule (lr 0.5), each on its own clipped
    # estimate and its own meta-loss, times its own step multiplier; checked with NumPy.
    lopt = LossScaledSGD()
    thetas = stack({"log_lr": jnp.log(2.0), "w": jnp.arange(5.0)},
                   {"log_lr": jnp.log(0.5), "w": -jnp.arange(5.0)})
    grads = grads_for(thetas, 3)
    losses, log_mult = jnp.array([0.3, -1.2]), jnp.log(jnp.array([1.0, 3.0]))
    outer = SelfTraining(policy="best", clip=0.2, clip_relative=False, max_update=100.0)
    new, _, shrink = outer.update(lopt, thetas, outer.init(lopt, thetas), grads, log_mult,
                                  jnp.asarray(1), KEY, losses)
    np.testing.assert_array_equal(shrink, [1.0, 1.0])
    for i, (loss, mult) in enumerate(zip([0.3, -1.2], [1.0, 3.0])):
        for name in ("log_lr", "w"):
            g = np.clip(np.asarray(grads[name][i]), -0.2, 0.2)
            np.testing.assert_allclose(np.asarray(new[name][i]) - np.asarray(thetas[name][i]),
                                       -0.5 * loss * mult * g, rtol=1e-5, atol=1e-7)


def test_random_policy_draws_donors_from_the_key():
    outer = SelfTraining(policy="random")
    donors = outer.donors(8, jnp.asarray(3), jax.random.key(4))
    np.testing.assert_array_equal(donors, jax.random.randint(jax.random.key(4), (8,), 0, 8))
    np.testing.assert_array_equal(SelfTraining(policy="self").donors(3, jnp.asarray(1), KEY),
                                  [0, 1, 2])
    np.testing.assert_array_equal(SelfTraining(policy="best").donors(3, jnp.asarray(1), KEY),
                                  [1, 1, 1])


def test_adam_control_takes_an_adam_step():
    thetas = stack(LOPT.init(jax.random.key(0)), LOPT.init(jax.random.key(1)))
    control = AdamControl(learning_rate=1e-3, clip=0.1, clip_relative=False, max_update=0.01)
    grads = grads_for(thetas)
    new, _, _ = control.update(LOPT, thetas, control.init(LOPT, thetas), grads,
                               jnp.log(jnp.array([1.0, 2.0])), jnp.asarray(0), KEY, LOSSES)
    # Adam's first step is -lr * sign(g) (up to eps), times the member's step multiplier.
    for got, th, g in zip(jax.tree.leaves(new), jax.tree.leaves(thetas), jax.tree.leaves(grads)):
        mult = np.array([1.0, 2.0]).reshape((2,) + (1,) * (g.ndim - 1))
        np.testing.assert_allclose(np.asarray(got) - th, -1e-3 * mult * np.sign(g), rtol=1e-3,
                                   atol=1e-6)


def test_exploit_and_explore_moves_exactly_the_bottom_quarter():
    pbt = PBT(exploit_fraction=0.25, resample_probability=0.0)
    hparams = Hyperparams(np.log(np.arange(1.0, 9.0, dtype=np.float32)),
                          np.log(np.full(8, 0.01, np.float32)))
    scores = np.array([0.5, 0.9, 0.1, 0.7, 0.3, 0.95, 0.2, 0.6])  # best: 2, 6; worst: 5, 1
    sources, new, copies = pbt.exploit_and_explore(scores, hparams, np.random.default_rng(0))
    assert sorted(child for child, _ in copies) == [1, 5]
    for child, parent in copies:
        assert parent in (2, 6) and sources[child] == parent
        for name in ("log_step_mult", "log_sigma"):
            ratio = np.exp(getattr(new, name)[child] - getattr(hparams, name)[parent])
            assert min(abs(ratio - 0.8), abs(ratio - 1.25)) < 1e-5
    kept = [i for i in range(8) if i not in (1, 5)]
    assert list(sources[kept]) == kept
    np.testing.assert_array_equal(new.log_step_mult[kept], hparams.log_step_mult[kept])


def test_sigma_can_be_kept_out_of_pbts_reach():
    pbt = PBT(explore_sigma=False, resample_probability=0.5)
    hparams = Hyperparams(np.zeros(4, np.float32), np.log(np.full(4, 0.01, np.float32)))
    _, new, copies = pbt.exploit_and_explore(np.arange(4.0), hparams, np.random.default_rng(1))
    assert copies and np.allclose(np.exp(new.log_sigma), 0.01)


def test_failed_members_are_replaced_by_healthy_ones():
    finite = np.array([True, False, True, True])
    sources, copies = replace_failed(finite, np.array([0.3, 0.1, 0.2, 0.9]),
                                         np.random.default_rng(0))
    assert [c for c, _ in copies] == [1]
    assert sources[1] in (0, 2) and list(sources[[0, 2, 3]]) == [0, 2, 3]
    # With no healthy member there is nothing to copy.
    sources, copies = replace_failed(np.zeros(3, bool), np.zeros(3), np.random.default_rng(0))
    assert copies == [] and list(sources) == [0, 1, 2]


def test_trust_region_bounds_the_step_rms_and_keeps_its_direction():
    thetas = stack(LOPT.init(jax.random.key(0)), LOPT.init(jax.random.key(1)))
    updates = grads_for(thetas, 2)  # RMS about 0.3 per member
    new, shrink = scale_and_add(thetas, updates, jnp.zeros(2), max_update=0.01)
    step = jax.tree.map(jnp.subtract, new, thetas)
    flat = lambda tree, i: np.concatenate([np.ravel(x[i]) for x in jax.tree.leaves(tree)])
    for i in range(2):
        np.testing.assert_allclose(np.sqrt(np.mean(flat(step, i) ** 2)), 0.01, rtol=1e-4)
        np.testing.assert_allclose(flat(step, i), float(shrink[i]) * flat(updates, i), rtol=1e-3,
                                   atol=1e-6)
    small, unbounded = scale_and_add(thetas, updates, jnp.zeros(2), max_update=10.0)
    np.testing.assert_array_equal(unbounded, np.ones(2))
    for got, th, u in zip(jax.tree.leaves(small), jax.tree.leaves(thetas), jax.tree.leaves(updates)):
        np.testing.assert_allclose(np.asarray(got) - np.asarray(th), u, rtol=1e-5, atol=1e-6)
    # the bound is on the step after the step multiplier: where it is active, the step has the
    # bound's length whatever the multiplier; where it is not, the multiplier scales the step
    rms = lambda new, i: np.sqrt(np.mean(flat(jax.tree.map(jnp.subtract, new, thetas), i) ** 2))
    log_mult = jnp.log(jnp.asarray([0.5, 4.0]))
    new, _ = scale_and_add(thetas, updates, log_mult, 0.01)
    np.testing.assert_allclose([rms(new, 0), rms(new, 1)], [0.01, 0.01], rtol=1e-4)
    new, shrink = scale_and_add(thetas, updates, log_mult, 10.0)
    np.testing.assert_array_equal(shrink, np.ones(2))
    base = [np.sqrt(np.mean(flat(updates, i) ** 2)) for i in range(2)]
    np.testing.assert_allclose([rms(new, 0), rms(new, 1)], [0.5 * base[0], 4.0 * base[1]],
                               rtol=1e-3)


@pytest.mark.parametrize("loss", ["mean", "final"])
def test_scores_average_the_normalised_loss_over_all_or_the_last_tenth_of_the_steps(loss):
    from selfopt.population import score_members
    from selfopt.tasks import make_task
    task = make_task({"family": "quadratic", "seed": 3, "dim": 8})
    thetas = stack(LOPT.init(jax.random.key(0)), LOPT.init(jax.random.key(1)))
    key = jax.random.key(7)
    scores = score_members(LOPT, thetas, task, key, num_steps=20, loss=loss)
    # by hand: the same two problems (keys, inits and batches), one optimizer step at a time
    expected = []
    for i in range(2):
        theta, per_problem = member(thetas, i), []
        for problem_key in jax.random.split(key, 2):
            init_key, data_key, _ = jax.random.split(problem_key, 3)
            params = task.init(init_key)
            opt = LOPT.optimizer(theta)
            state = opt.init(params)
            init_loss = task.loss(params, task.sample_batch(jax.random.fold_in(data_key, 0)))
            losses = []
            for t in range(20):
                batch = task.sample_batch(jax.random.fold_in(data_key, t))
                value, grads = jax.value_and_grad(task.loss)(params, batch)
                losses.append(float(np.clip(task.normalize(value, init_loss), 0, 10)))
                updates, state = opt.update(grads, state, params)
                params = jax.tree.map(jnp.add, params, updates)
            per_problem.append(np.mean(losses if loss == "mean" else losses[-2:]))
        expected.append(np.mean(per_problem))
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown loss average"):
        score_members(LOPT, thetas, task, key, num_steps=20, loss="last")


def test_outer_defaults_and_kinds():
    outer, control = SelfTraining(), AdamControl()
    assert (outer.kind, control.kind) == ("self", "adam")
    assert (outer.label, control.label) == ("self-training", "adam-control")
    for o in (outer, control):
        assert (o.clip, o.clip_relative, o.max_update) == (3.0, True, 0.003)
    assert outer.policy == "self" and control.learning_rate == 1e-3
    # outer optimizers are plain, hashable configuration: no architecture inside
    assert "lopt" not in {f.name for f in dataclasses.fields(SelfTraining)}
    assert hash(SelfTraining(policy="best")) == hash(SelfTraining(policy="best"))
    pbt = PBT()
    assert (pbt.interval, pbt.score_loss) == (50, "final")
    assert PBT(sigma_prior=[0.01, 0.02]).sigma_prior == (0.01, 0.02)  # a JSON list is fine


@pytest.mark.parametrize("cls,field,value", [
    (SelfTraining, "policy", "x"), (SelfTraining, "clip", 0.0), (SelfTraining, "clip", "1"),
    (SelfTraining, "clip_relative", 1), (SelfTraining, "max_update", -0.1),
    (AdamControl, "learning_rate", 0.0), (AdamControl, "clip", float("nan")),
    (AdamControl, "max_update", 0.0), (AdamControl, "clip_relative", "yes"),
    (PBT, "interval", 0), (PBT, "interval", 2.5), (PBT, "exploit_fraction", 0.6),
    (PBT, "resample_probability", 1.5), (PBT, "perturb_factors", ()),
    (PBT, "perturb_factors", (0.8, -1.25)), (PBT, "step_mult_prior", (0.3,)),
    (PBT, "step_mult_prior", (3.0, 2000.0)), (PBT, "sigma_prior", (1, 0.1)),
    (PBT, "sigma_prior", (0.0, 0.1)), (PBT, "explore_sigma", 1), (PBT, "score_steps", 0),
    (PBT, "score_loss", "last"),
])
def test_a_bad_field_is_a_one_line_error_that_names_it(cls, field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be .*, got ") as err:
        cls(**{field: value})
    assert "\n" not in str(err.value)


# -- the population state and its lineage --------------------------------------------------

def tiny_state():
    return tiny(), initial_state(tiny())


def test_the_population_state_is_a_pytree_of_its_arrays_and_round_trips_a_checkpoint():
    cfg, state = tiny_state()
    leaves = jax.tree.leaves(state)
    assert len(leaves) == len(jax.tree.leaves(state.arrays())) > 10
    doubled = jax.tree.map(lambda x: x * 2 if jnp.issubdtype(x.dtype, jnp.floating) else x,
                           state)
    assert isinstance(doubled, PopulationState) and doubled.lineage == state.lineage
    np.testing.assert_array_equal(jax.tree.leaves(doubled.thetas)[0],
                                  2 * jax.tree.leaves(state.thetas)[0])
    meta = json.loads(json.dumps(state.metadata()))  # as a checkpoint stores it
    again = PopulationState.from_checkpoint(state.arrays(), meta)
    assert (again.step, again.lineage, again.scores, again.slot_configs) == (
        state.step, state.lineage, state.scores, state.slot_configs)
    assert jax.tree.structure(again) == jax.tree.structure(state)


def test_copy_members_moves_weights_and_records_the_lineage_without_touching_the_input():
    cfg, state = tiny_state()
    state = state.replace(scores=(3.0, 1.0, 2.0, 4.0))
    sources = np.array([0, 1, 2, 1])  # position 3 becomes a copy of position 1
    after, (event,) = copy_members(state, sources, [(3, 1)], {3: "exploit"})
    for a, b in zip(jax.tree.leaves(member(after.thetas, 3)),
                    jax.tree.leaves(member(state.thetas, 1))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(after.hparams.log_sigma[3], state.hparams.log_sigma[1])
    assert after.lineage.ids == (0, 1, 2, 4) and after.lineage.generation == (0, 0, 0, 1)
    assert after.lineage.next_id == 5 and dict(after.lineage.counts) == {"exploit": 1}
    assert after.scores == (3.0, 1.0, 2.0, 1.0)
    assert event == {"step": 0, "kind": "exploit", "position": 3, "child_id": 4,
                     "replaced_id": 3, "parent_id": 1, "parent_position": 1, "generation": 1,
                     "parent_score": 1.0, "replaced_score": 4.0,
                     "before": event["before"], "after": event["after"]}
    assert event["before"] == event["after"]  # no new hyperparameters: the parent's
    assert state.lineage.ids == (0, 1, 2, 3)  # the input state is unchanged
