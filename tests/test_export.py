"""Exported optimizer files: ``selfopt export``, ``selfopt.load``, the shipped optimizer, and the
one-line errors for files that cannot be used."""
import json
import shutil
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import selfopt
from selfopt import lopt_file
from selfopt.cli import main
from selfopt.export import PRETRAINED, architecture, read
from selfopt.lopt import HierarchicalLOpt, MLPLOpt
from selfopt.lopt_file import LOptFileError
from selfopt.run_dir import open_checkpoint

RUN = Path(__file__).parent / "data" / "run_632c2b2"


@pytest.fixture()
def run(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(RUN, run_dir)
    return run_dir


def test_export_writes_the_elite_with_its_record_and_loads_as_the_same_optimizer(run, capsys):
    out = run.parent / "opt.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out

    lopt, theta, meta = read(out)
    cfg, state, _ = open_checkpoint(run)
    assert state.elite is not None
    expected = state.elite.theta
    jax.tree.map(np.testing.assert_array_equal, theta, expected)
    assert lopt == cfg.lopt
    assert meta["architecture"] == json.loads(json.dumps(architecture(cfg.lopt)))
    assert meta["training"]["seed"] == cfg.seed
    assert meta["training"]["outer_steps"] == state.step
    assert meta["training"]["config"] == cfg.to_json()
    assert meta["exported"]["date"].startswith("20")

    # The loaded optax optimizer takes the same steps as the run's own candidate.
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros(4)}
    grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) + 0.1, params)
    opt = selfopt.load(out)
    ref = cfg.lopt.optimizer(expected)
    u1, _ = opt.update(grads, opt.init(params), params)
    u2, _ = ref.update(grads, ref.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, u1, u2)


def test_export_default_path_and_bad_targets(run, tmp_path, capsys):
    assert main(["export", str(run)]) == 0
    assert (run / "optimizer.safetensors").is_file()
    capsys.readouterr()
    assert main(["export", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run directory or checkpoint file" in err
    assert main(["export", str(run), "--member", "99"]) == 2
    assert "not in the population" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def _write(path, lopt, key=0):
    lopt_file.write(path, lopt.init(jax.random.key(key)), {"architecture": architecture(lopt)})


def test_damaged_newer_foreign_and_mismatched_files_give_one_line_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    _write(good, MLPLOpt())
    read(good)  # fine

    # a flipped bit in the weights
    data = bytearray(good.read_bytes())
    data[-3] ^= 0x10
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data))
    with pytest.raises(LOptFileError, match="damaged"):
        read(flipped)

    # a truncated file
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(LOptFileError, match="not a readable selfopt optimizer file"):
        read(truncated)

    # a newer format version (a valid file otherwise, so only the version can refuse it)
    size = struct.unpack("<Q", good.read_bytes()[:8])[0]
    header = json.loads(good.read_bytes()[8:8 + size])
    inner = json.loads(header["__metadata__"][lopt_file.KEY])
    inner["format_version"] = lopt_file.FORMAT_VERSION + 1
    header["__metadata__"][lopt_file.KEY] = json.dumps(inner)
    blob = json.dumps(header).encode()
    newer = tmp_path / "newer.safetensors"
    newer.write_bytes(struct.pack("<Q", len(blob)) + blob + good.read_bytes()[8 + size:])
    with pytest.raises(LOptFileError, match="newer than this selfopt reads"):
        read(newer)

    # a training checkpoint is not an optimizer file
    ckpt = sorted((RUN / "checkpoints").glob("*.safetensors"))[-1]
    with pytest.raises(LOptFileError, match="training checkpoint: export it with selfopt export RUN"):
        read(ckpt)

    # weights of another architecture under this one's name
    lying = tmp_path / "lying.safetensors"
    lopt_file.write(lying, HierarchicalLOpt().init(jax.random.key(0)),
                    {"architecture": architecture(MLPLOpt())})
    with pytest.raises(LOptFileError, match="does not fit MLPLOpt"):
        read(lying)

    # an architecture this selfopt does not know
    alien = tmp_path / "alien.safetensors"
    lopt_file.write(alien, MLPLOpt().init(jax.random.key(0)),
                    {"architecture": {"kind": "velo", "config": {}}})
    with pytest.raises(LOptFileError, match="cannot build its architecture"):
        read(alien)
    for path in (flipped, truncated, newer, ckpt, lying, alien):
        with pytest.raises(LOptFileError) as err:
            read(path)
        assert "\n" not in str(err.value)


def test_flatten_unflatten_round_trip_keeps_scalars_and_lists():
    theta = HierarchicalLOpt().init(jax.random.key(3))
    back = lopt_file.unflatten(lopt_file.flatten(theta))
    assert jax.tree.structure(back) == jax.tree.structure(theta)
    jax.tree.map(np.testing.assert_array_equal, back, theta)
    assert np.shape(back["head"]["b"]) == ()
    with pytest.raises(LOptFileError, match="skip an index"):
        lopt_file.unflatten({"layers.0.w": np.zeros(1), "layers.2.w": np.zeros(1)})


def test_the_shipped_optimizer_loads_and_trains_a_quadratic():
    _, _, meta = read(PRETRAINED)
    assert meta["training"]["command"].startswith("selfopt train")
    opt = selfopt.pretrained(num_steps=200)
    target = jnp.linspace(-1.0, 1.0, 16)
    loss = lambda p: jnp.mean(jnp.square(p["x"] - target))
    params = {"x": jnp.zeros(16)}
    state = opt.init(params)
    start = loss(params)
    for _ in range(200):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params, loss=value)
        params = optax.apply_updates(params, updates)
    assert loss(params) < 0.1 * start


def test_eval_accepts_an_exported_file(run, capsys):
    out = run.parent / "opt.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert main(["eval", str(out), "--tasks", "quick", "--steps", "20", "--seeds", "1",
                 "--member", "1"]) == 2
    assert "--member applies to a run" in capsys.readouterr().err


def test_a_new_run_records_its_provenance_and_the_export_carries_it(tmp_path, monkeypatch):
    from test_reliability import tiny_argv

    out = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["/somewhere/bin/selfopt", "train", "--seed", "7"])
    assert main(["train", "--out", str(out), "--max-steps", "2", "--quiet", *tiny_argv()]) == 0
    record = json.loads((out / "provenance.json").read_text())
    assert record["command"] == "selfopt train --seed 7"
    assert record["date"].startswith("20") and "commit" in record
    monkeypatch.setattr("sys.argv", ["selfopt", "train", "--resume", str(out)])
    assert main(["train", "--resume", str(out), "--max-steps", "3", "--quiet"]) == 0
    assert json.loads((out / "provenance.json").read_text()) == record  # the start's, kept
    assert main(["export", str(out)]) == 0
    _, _, meta = read(out / "optimizer.safetensors")
    assert meta["training"]["command"] == "selfopt train --seed 7"
    assert meta["training"]["outer_steps"] == 3 and meta["evaluation"] is None
