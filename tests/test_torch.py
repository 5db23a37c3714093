"""The PyTorch drop-in (``selfopt.torch``): parity with the JAX optimizers, the torch.optim
contract (parameter groups, closure, state_dict), dtypes, and no JAX in its process."""
import copy
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

import selfopt.torch as st  # noqa: E402
from selfopt import lopt_file  # noqa: E402
from selfopt.export import architecture  # noqa: E402
from selfopt.lopt import HierarchicalLOpt, MLPLOpt, ScheduledLOpt  # noqa: E402

SHAPES = {"w1": (40, 48), "b1": (48,), "w2": (48, 4), "b2": (4,)}  # fan-ins over width_base


def T(a):
    """JAX layout (in, out) <-> PyTorch layout (out, in)."""
    return a.T if a.ndim == 2 else a


def weights_file(tmp_path, lopt):
    theta = lopt.init(jax.random.key(1))
    if "head" in theta:  # a non-zero step head, so the cell's steps count in the comparison
        theta["head"] = {"w": 0.5 * jax.random.normal(jax.random.key(2), (lopt.cell_size,)),
                         "b": jnp.float32(0.3)}
    if "schedule" in theta:  # a non-zero schedule, likewise
        k = jnp.arange(lopt.schedule_knots, dtype=jnp.float32)
        theta["schedule"] = 0.5 * jnp.cos(3.0 * k) - 0.3 * k
    path = tmp_path / f"{lopt.kind}.safetensors"
    lopt_file.write(path, theta, {"architecture": architecture(lopt)})
    return path, theta


@pytest.mark.parametrize("chunk_rows", [st.CHUNK_ROWS, 37], ids=["one-block", "blocks-of-37"])
@pytest.mark.parametrize("lopt", [MLPLOpt(), ScheduledLOpt(), HierarchicalLOpt()],
                         ids=lambda l: l.kind)
def test_updates_equal_the_jax_optimizer_over_100_steps(tmp_path, monkeypatch, lopt, chunk_rows):
    # blocks of 37 parameters straddle the boundaries of the tensors (1,920, 48, 192 and 4)
    monkeypatch.setattr(st, "CHUNK_ROWS", chunk_rows)
    path, theta = weights_file(tmp_path, lopt)
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.3)
              for k, s in SHAPES.items()}
    jax_opt = lopt.optimizer(theta, num_steps=100)
    update, state = jax.jit(jax_opt.update), jax_opt.init(params)
    tp = {k: torch.nn.Parameter(torch.tensor(T(np.asarray(v)).copy())) for k, v in params.items()}
    # two parameter groups: the per-tensor maths must not depend on how tensors are grouped
    opt = st.LearnedOptimizer([{"params": [tp["w1"], tp["w2"]]}, {"params": [tp["b1"], tp["b2"]]}],
                              weights=st.load(path), num_steps=100)
    worst = 0.0
    for t in range(100):
        grads = {k: jnp.asarray(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()}
        loss = float(np.exp(-t / 30) + 0.05 * rng.normal())
        u, state = update(grads, state, params, loss=loss)
        params = optax.apply_updates(params, u)
        for k, p in tp.items():
            p.grad = torch.tensor(T(np.asarray(grads[k])).copy())
        with torch.no_grad():  # the updates themselves (a difference of parameters would lose
            for group in opt.param_groups:  # digits to float32 rounding)
                ups = opt._updates(group["params"], opt._depth_factor(), torch.tensor(loss))
                for p, up in zip(group["params"], ups):
                    name = next(k for k, q in tp.items() if q is p)
                    ref = T(np.asarray(u[name]))
                    worst = max(worst, np.linalg.norm(up.numpy() - ref) / np.linalg.norm(ref))
                    p.add_(up)
    assert worst < 1e-5
    for k, p in tp.items():
        np.testing.assert_allclose(p.detach().numpy(), T(np.asarray(params[k])), rtol=1e-5,
                                   atol=1e-6)


def model_and_data(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(64, 6)
    y = torch.sin(x.sum(1, keepdim=True))
    return model.to(dtype), x.to(dtype), y.to(dtype)


def train(model, opt, x, y, steps, closure=False):
    losses = []
    for _ in range(steps):
        def compute():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        if closure:
            losses.append(float(opt.step(compute).detach()))
        else:
            loss = compute()
            opt.step(loss=loss)
            losses.append(float(loss.detach()))
    return losses


def test_pretrained_trains_a_torch_model_and_state_dict_round_trips():
    model, x, y = model_and_data()
    opt = st.LearnedOptimizer(model.parameters(), weights=st.pretrained(), num_steps=300)
    losses = train(model, opt, x, y, 150)
    assert losses[-1] < 0.5 * losses[0]

    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, x, y, 20)
    model2, _, _ = model_and_data(seed=1)
    model2.load_state_dict(saved_model)
    opt2 = st.LearnedOptimizer(model2.parameters(), weights=st.pretrained(), num_steps=300)
    opt2.load_state_dict(saved_opt)
    train(model2, opt2, x, y, 20)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_closure_and_the_loss_the_hierarchical_optimizer_reads(tmp_path):
    path, _ = weights_file(tmp_path, HierarchicalLOpt())
    model, x, y = model_and_data()
    opt = st.LearnedOptimizer(model.parameters(), weights=st.load(path), num_steps=50)
    losses = train(model, opt, x, y, 5, closure=True)
    assert all(np.isfinite(losses))
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(ValueError, match="reads the loss"):
        opt.step()
    assert float(opt.state[next(model.parameters())]["step"]) == 5


def test_bfloat16_parameters_take_the_float32_steps_rounded():
    model32, x, y = model_and_data()
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    opt32 = st.LearnedOptimizer(model32.parameters(), weights=st.pretrained())
    opt16 = st.LearnedOptimizer(model16.parameters(), weights=st.pretrained())
    l32 = train(model32, opt32, x, y, 30)
    l16 = train(model16, opt16, x.bfloat16(), y.bfloat16(), 30)
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())
    assert l16[-1] < 0.8 * l16[0]
    assert abs(l16[-1] - l32[-1]) < 0.1 * l32[0]
    # state stays float32 through a state_dict round trip (torch.optim would cast it to bf16)
    opt16b = st.LearnedOptimizer(model16.parameters(), weights=st.pretrained())
    opt16b.load_state_dict(copy.deepcopy(opt16.state_dict()))
    state = opt16b.state[next(model16.parameters())]
    assert state["momenta"].dtype == state["rms"].dtype == torch.float32
    torch.testing.assert_close(state["momenta"], opt16.state[next(model16.parameters())]["momenta"],
                               rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("lopt", [MLPLOpt(), ScheduledLOpt(), HierarchicalLOpt()],
                         ids=lambda l: l.kind)
def test_cuda_training_equals_the_cpu_training(tmp_path, lopt):
    # the same update with the device's own kernels (where a GPU is lent; skipped here)
    path, _ = weights_file(tmp_path, lopt)
    model, x, y = model_and_data()
    gpu = copy.deepcopy(model).cuda()
    cpu_losses = train(model, st.LearnedOptimizer(model.parameters(), weights=st.load(path),
                                                  num_steps=40), x, y, 40)
    gpu_losses = train(gpu, st.LearnedOptimizer(gpu.parameters(), weights=st.load(path),
                                                num_steps=40), x.cuda(), y.cuda(), 40)
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-4)
    for a, b in zip(model.parameters(), gpu.parameters()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-6)


def test_bad_input_is_refused_in_one_line(tmp_path):
    with pytest.raises(TypeError, match="selfopt.torch.pretrained"):
        st.LearnedOptimizer([torch.nn.Parameter(torch.zeros(3))], weights="pretrained")
    with pytest.raises(TypeError, match="floating-point"):
        st.LearnedOptimizer([torch.zeros(3, dtype=torch.int64)], weights=st.pretrained())
    with pytest.raises(ValueError, match="num_steps"):
        st.LearnedOptimizer([torch.nn.Parameter(torch.zeros(3))], weights=st.pretrained(),
                            num_steps=0)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file at all")
    with pytest.raises(lopt_file.LOptFileError) as err:
        st.load(broken)
    assert "\n" not in str(err.value)


def test_selfopt_torch_runs_without_importing_jax():
    code = ("import sys, torch, selfopt.torch as st\n"
            "m = torch.nn.Linear(3, 2)\n"
            "opt = st.LearnedOptimizer(m.parameters(), weights=st.pretrained())\n"
            "m(torch.ones(4, 3)).sum().backward(); opt.step()\n"
            "assert 'jax' not in sys.modules, sorted(k for k in sys.modules if 'jax' in k)\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_torch_side_knows_every_field_of_each_architecture():
    import dataclasses

    for lopt in (MLPLOpt(), HierarchicalLOpt()):
        assert set(st.KINDS[lopt.kind]) == {f.name for f in dataclasses.fields(lopt)}
