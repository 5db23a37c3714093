"""Bad input never gets a traceback: random configs, flag sets, config files and damaged
checkpoints, thrown by hypothesis (docs/reliability.md).

Every case goes through ``selfopt.cli.main(argv)``: either the configuration is valid (its
components build; the run would start, which the stub below stops just before it writes
anything) or the answer is exit status 2 with exactly one line on stderr, naming the field at
fault, and nothing written. A few valid tiny configurations really run.

The default suite throws ~200 cases per property; ``python -m pytest -m slow tests/test_fuzz.py
-s`` throws the full 1,000+ and prints the counts.
"""
import json
import re
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import selfopt.train
from selfopt import checkpoint as ckpt
from selfopt.cli import main
from selfopt.config import SECTIONS, TrainConfig, make_config
from selfopt.estimators.inner_problem import LOSS_AVERAGES, NORMALIZATIONS
from selfopt.population.self_training import POLICIES
from selfopt.tasks.distribution import GRIDS, HELDOUT_FAMILIES, TRAIN_FAMILIES
from selfopt.run_dir import RunDir
from selfopt.train import train
from test_train import tiny

DEFAULT_CASES, FULL_CASES = 200, 1200
FLAGS = {"population": "--population", "minutes": "--minutes", "max_steps": "--max-steps",
         "seed": "--seed", "outer.kind": "--outer-optimizer", "outer.policy": "--policy",
         "estimator.kind": "--estimator"}


def _defaults() -> dict:
    """Every dotted field of the configuration and its default (a section's other kinds'
    fields too, with their class's default)."""
    flat = {k: v for k, v in TrainConfig().to_json().items() if k not in SECTIONS}
    for section, classes in SECTIONS.items():
        for cls in classes:
            flat.update({f"{section}.{k}": tuple(v) if isinstance(v, list) else v
                         for k, v in make_config({f"{section}.kind": cls.kind} if len(classes) > 1
                                                 else {}).to_json()[section].items()})
    return flat


FIELDS = _defaults()
#: Every word the configuration accepts somewhere, so that string fields are often valid.
WORDS = sorted({c.kind for classes in SECTIONS.values() if len(classes) > 1 for c in classes}
               | set(POLICIES) | set(NORMALIZATIONS) | set(LOSS_AVERAGES) | set(GRIDS)
               | set(TRAIN_FAMILIES) | set(HELDOUT_FAMILIES))
# Command-line text: what execve can carry (no NUL) and a UTF-8 stderr can print.
ARG_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                   max_size=12)


class Started(Exception):
    """Raised by the stubbed :func:`selfopt.train.train`: the CLI accepted the input and would
    train."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg


def junk():
    """Values of the wrong type or out of any range."""
    return st.one_of(
        st.none(), st.booleans(), st.floats(), st.integers(-10**30, 10**400),
        st.text(max_size=8), st.lists(st.integers(-3, 3) | st.text(max_size=3), max_size=3),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        st.sampled_from([float("nan"), float("inf"), -float("inf"), 10**5000 // 10**4000, 1e308]))


def near(default):
    """Values of a field's own type, around and beyond its valid range."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(-2, max(8, 2 * default)) | st.sampled_from([0, 1, 2, 4096, 10**6 + 1])
    if isinstance(default, float):
        return st.floats(-1.0, max(2.0, 3 * default)) | st.sampled_from([0.0, 1e-9, 1e6, 1e7])
    if isinstance(default, str):
        return st.sampled_from(WORDS) | st.text(max_size=6)
    if isinstance(default, tuple):
        element = near(default[0]) if default else st.integers()
        return st.lists(element, max_size=len(default) + 2)
    return junk()


def plausible(default):
    """Values a user would likely type: the default or a small change of it."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, (int, float)):
        return st.sampled_from([default, default * 2, default + 1, default / 2 or 1])
    if isinstance(default, tuple):
        return st.sampled_from([list(default), list(default[:1])])
    return st.just(default)


def field_value(name: str):
    default = FIELDS[name]
    return st.one_of(plausible(default), near(default), junk())


@st.composite
def overrides(draw):
    """Some fields (now and then an unknown one) with near-valid or junk values."""
    names = draw(st.lists(st.sampled_from(sorted(FIELDS)) | ARG_TEXT.filter(
        lambda n: n not in FIELDS and "=" not in n), max_size=5, unique=True))
    return {n: draw(field_value(n) if n in FIELDS else junk()) for n in names}


def as_text(value) -> str:
    """A value as a user types it: JSON, or a bare word for strings."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


CONFIG_FILE_BODIES = st.one_of(
    st.just(b""), st.just(b"[1, 2]"), st.just(b'"population"'), st.just(b"null"),
    st.just(b"{"), st.just(b'{"population": NaN}'), st.just(b'{"minutes": 1e999}'),
    st.just(b'{"seed": ' + b"9" * 5000 + b"}"), st.just(b"[" * 100_000 + b"]" * 100_000),
    st.just(b'{"outer": {"clip": ' + b"1" * 400 + b"}}"), st.just(b'{"lopt": [1]}'),
    st.just(b'{"outer": {"kind": "adam", "policy": "best"}}'), st.just(b"\xff\xfe{\x00"),
    st.binary(max_size=40))


@st.composite
def cli_cases(draw):
    """argv for ``selfopt train`` (without --out) and the config file's bytes (or None)."""
    values = draw(overrides())
    argv, in_file = [], {}
    for name, value in values.items():
        how = draw(st.sampled_from(["flag", "set", "file"] if name in FLAGS else ["set", "file"]))
        if how == "flag":
            argv += [FLAGS[name], as_text(value)]
        elif how == "set":
            argv += ["--set", f"{name}={as_text(value)}"]
        else:
            in_file[name] = value
    body = None
    if in_file or draw(st.booleans()):
        body = (json.dumps(in_file).encode() if in_file and draw(st.integers(0, 4))
                else draw(CONFIG_FILE_BODIES))
    extra = draw(st.lists(st.sampled_from(
        ["--bogus", "-x", "--set", "--set=", "--set", "noequals", "--population", "--quiet",
         "positional", "--max-steps=3", "--resume", "--config"]) | ARG_TEXT, max_size=2))
    if extra and draw(st.booleans()):
        argv += extra
    return argv, body, values


def run_cli(argv, capsys):
    """``main(argv)``: (exit status or "started", stdout, stderr, the started config)."""
    capsys.readouterr()
    started = None
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    except Started as exc:
        code, started = "started", exc.cfg
    out, err = capsys.readouterr()
    return code, out, err, started


def check_case(case, workdir: Path, capsys, stats: dict) -> None:
    argv, body, values = case
    out = workdir / "run"
    argv = ["train", "--out", str(out), "--quiet", *argv]
    if body is not None:
        (workdir / "config.json").write_bytes(body)
        argv += ["--config", str(workdir / "config.json")]
    code, stdout, err, cfg = run_cli(argv, capsys)
    if code == "started":
        stats["valid"] += 1
        assert isinstance(cfg, TrainConfig) and make_config(cfg.to_json()) == cfg
        assert err == "" and stdout == ""
    else:
        stats["errors"] += 1
        assert code == 2, (argv, code, err)
        assert err.count("\n") == 1 and err.startswith("selfopt: error: "), (argv, err)
        assert "Traceback" not in err and stdout == ""
        # Defaults are valid, so a field blamed must be one this case set (in argv or the file).
        if blamed := re.match(r"selfopt: error: config field '([^']+)'", err):
            # cross-field, --max-steps=
            named = set(values) | {"estimator.max_inner_length", "max_steps"}
            try:
                loaded = json.loads(body or b"null") or {}
                for key, value in loaded.items():
                    named.add(key)
                    if isinstance(value, dict):  # a section as an object
                        named |= {f"{key}.{field}" for field in value}
            except (ValueError, TypeError, RecursionError, AttributeError):
                pass
            assert blamed.group(1) in named, err
    assert not out.exists(), argv  # nothing written, whatever the answer
    stats["cases"] += 1


def fuzz_cli(num_cases: int, tmp_path, capsys, monkeypatch) -> dict:
    def run(cfg, run_dir, **kwargs):
        raise Started(cfg)

    monkeypatch.setattr(selfopt.train, "train", run)
    stats = {"cases": 0, "valid": 0, "errors": 0}

    @settings(max_examples=num_cases, deadline=None, database=None,
              derandomize=num_cases <= DEFAULT_CASES,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(case=cli_cases())
    def one(case):
        stats["drawn"] = stats.get("drawn", 0) + 1
        workdir = tmp_path / f"case-{stats['drawn']}"
        workdir.mkdir()
        check_case(case, workdir, capsys, stats)

    started = time.monotonic()
    one()
    stats["seconds"] = round(time.monotonic() - started, 1)
    return stats


def test_random_configs_and_flags_start_or_fail_cleanly(tmp_path, capsys, monkeypatch):
    stats = fuzz_cli(DEFAULT_CASES, tmp_path, capsys, monkeypatch)
    assert stats["cases"] >= DEFAULT_CASES * 0.9
    # both answers are exercised (how many draws are valid shifts with the number of fields:
    # each drawn field can make a case invalid)
    assert stats["valid"] >= 5 and stats["errors"] >= 50


@pytest.mark.slow
def test_random_configs_and_flags_full(tmp_path, capsys, monkeypatch):
    stats = fuzz_cli(FULL_CASES, tmp_path, capsys, monkeypatch)
    with capsys.disabled():
        print(f"\nfuzzed {stats['cases']} config/flag sets: {stats['valid']} valid, "
              f"{stats['errors']} clean errors, {stats['seconds']} s")
    assert stats["cases"] >= 1000


def test_resume_with_bad_paths_and_flags_fails_cleanly(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_bytes(b"\xff\xfe not json")
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "config.json").write_text('{"population": "eight"}')
    for argv in (["--resume", str(tmp_path / "missing")], ["--resume", str(tmp_path / "file")],
                 ["--resume", str(tmp_path / "garbage")], ["--resume", str(tmp_path / "wrong")],
                 ["--resume", str(tmp_path / "missing"), "--population", "3"],
                 ["--resume", str(tmp_path / "missing"), "--out", str(tmp_path / "x")],
                 ["--config", str(tmp_path / "garbage")], ["--config", str(tmp_path)],
                 ["--set", "seed=" + "[" * 50_000], ["--set", "seed=" + "9" * 5000]):
        code, stdout, err, _ = run_cli(["train", "--quiet", *argv], capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("selfopt: error: "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "garbage", "wrong"]


# -- valid configurations really start -------------------------------------------------------

@st.composite
def tiny_valid_configs(draw):
    """Valid configurations small enough to run a step in seconds."""
    hi = draw(st.floats(0.3, 30))
    outer = draw(st.sampled_from(["self", "adam"]))
    return {
        "population": draw(st.integers(2, 3)), "estimator.num_pairs": draw(st.integers(1, 2)),
        "estimator.truncation_length": draw(st.integers(1, 3)),
        "lopt.hidden": draw(st.lists(st.integers(1, 8), min_size=1, max_size=2)),
        "tasks.families": draw(st.lists(st.sampled_from(
            ["quadratic", "test_function", "logistic", "mlp"]), min_size=1, max_size=2,
            unique=True)),
        "estimator.kind": draw(st.sampled_from(["es", "pes"])),
        "outer.kind": outer,
        **({"outer.policy": draw(st.sampled_from(["self", "best", "random"]))}
           if outer == "self" else {}),
        "estimator.normalization": draw(st.sampled_from(["ratio", "log"])),
        "estimator.min_inner_length": 2,
        "estimator.max_inner_length": draw(st.integers(2, 10)),
        "num_slots": draw(st.integers(1, 2)), "task_steps": draw(st.integers(1, 3)),
        "pbt.interval": 1, "pbt.score_steps": draw(st.integers(1, 3)), "validate_steps": 2,
        "pbt.exploit_fraction": draw(st.sampled_from([0.0, 0.25, 0.5])),
        "pbt.resample_probability": draw(st.floats(0, 1)),
        "pbt.explore_sigma": draw(st.booleans()),
        "pbt.step_mult_prior": [draw(st.floats(1e-3, hi)), hi],
        "pbt.sigma_prior": sorted([draw(st.floats(1e-4, 1.0)), draw(st.floats(1e-4, 1.0))]),
        "outer.clip": draw(st.floats(1e-3, 10)), "outer.clip_relative": draw(st.booleans()),
        "outer.max_update": draw(st.floats(1e-4, 1.0)),
        "estimator.loss_cap": draw(st.floats(1.5, 100)), "checkpoint_seconds": 0,
        "eval_minutes": 0, "seed": draw(st.integers(0, 2**31 - 1)),
    }


def run_valid(num_cases: int, tmp_path, capsys) -> int:
    count = [0]

    @settings(max_examples=num_cases, deadline=None, database=None,
              derandomize=num_cases <= 1,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(values=tiny_valid_configs())
    def one(values):
        out = tmp_path / f"run-{count[0]}"
        count[0] += 1
        argv = ["train", "--out", str(out), "--quiet", "--max-steps", "2",
                *[a for k, v in values.items() for a in ("--set", f"{k}={json.dumps(v)}")]]
        code, stdout, err, _ = run_cli(argv, capsys)
        assert code == 0, (values, err)
        assert "Traceback" not in err and "checkpoint:" in stdout
        meta = ckpt.read_metadata(out / "checkpoints" / "step-00000002.safetensors")
        assert meta["run"]["step"] == 2

    one()
    return count[0]


def test_valid_random_configs_really_run(tmp_path, capsys):
    assert run_valid(1, tmp_path, capsys) == 1  # each costs a compilation: 1 here, 25 in full


@pytest.mark.slow
def test_valid_random_configs_really_run_full(tmp_path, capsys):
    assert run_valid(25, tmp_path, capsys) == 25


# -- damaged checkpoints -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    summary = train(tiny(max_steps=2), out)
    return Path(summary["checkpoint"])


def fuzz_checkpoint(num_cases: int, checkpoint_file, tmp_path) -> dict:
    cfg, run = tiny(max_steps=2), RunDir(checkpoint_file.parent.parent)
    good = run.load(cfg, checkpoint_file)
    original = checkpoint_file.read_bytes()
    stats = {"cases": 0, "rejected": 0, "harmless": 0}

    @settings(max_examples=num_cases, deadline=None, database=None,
              derandomize=num_cases <= DEFAULT_CASES,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(cut=st.integers(0, len(original)), flips=st.lists(
        st.tuples(st.integers(0, len(original) - 1), st.integers(1, 255)), max_size=3),
        tail=st.binary(max_size=16))
    def one(cut, flips, tail):
        data = bytearray(original)
        for at, mask in flips:
            data[at] ^= mask
        data = bytes(data[:cut]) + tail if cut < len(original) else bytes(data)
        path = tmp_path / "damaged.safetensors"
        path.write_bytes(data)
        stats["cases"] += 1
        try:
            state = run.load(cfg, path)
        except ckpt.CheckpointError as err:
            assert "\n" not in str(err)
            stats["rejected"] += 1
            return
        # Accepted: then it is the checkpoint as saved, bit for bit (a flip in JSON
        # whitespace or padding changes nothing that is read).
        stats["harmless"] += 1
        assert state.step == good.step and state.lineage == good.lineage
        for a, b in zip(jax_leaves(state), jax_leaves(good)):
            np.testing.assert_array_equal(a, b)

    one()
    return stats


def jax_leaves(state):
    """The state's arrays as numpy (PRNG keys as their data)."""
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype,
                                                                        jax.dtypes.prng_key)
                       else x) for x in jax.tree.leaves(state.arrays())]


def test_damaged_checkpoints_are_rejected_or_harmless(checkpoint_file, tmp_path):
    stats = fuzz_checkpoint(100, checkpoint_file, tmp_path)
    assert stats["cases"] >= 90 and stats["rejected"] >= 80


@pytest.mark.slow
def test_damaged_checkpoints_full(checkpoint_file, tmp_path, capsys):
    stats = fuzz_checkpoint(1000, checkpoint_file, tmp_path)
    with capsys.disabled():
        print(f"\ndamaged checkpoints: {stats}")
    assert stats["cases"] >= 1000


def test_every_field_has_a_one_line_error_naming_it(capsys, tmp_path):
    """The simplest bad value of each field (a wrong type) is refused by name."""
    for name in sorted(FIELDS):
        code, _, err, _ = run_cli(["train", "--out", str(tmp_path / "run"), "--set",
                                   f"{name}={json.dumps({'bad': 1})}"], capsys)
        assert code == 2 and err.count("\n") == 1 and f"'{name}'" in err, (name, err)
    assert not (tmp_path / "run").exists()
