"""The experiments' command line (ml_collections.config_flags), config validation before any work,
and the README's bring-your-own-data commands run for two steps."""

import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from experiments import _runner
from experiments import train as train_cmd
from experiments._cli import UsageError, apply_overrides, load_config, parse_args
from experiments._runner import ConfigError, base_config, train_denoiser, validate_config


def _config():
    c = ml_collections.ConfigDict()
    c.train = ml_collections.ConfigDict(dict(steps=10, lr=1e-3, flag=False, name="a"))
    c.model = ml_collections.ConfigDict(dict(mult=(1, 2), classes=None))
    c.data = ml_collections.ConfigDict(dict(kwargs=dict(size=8)))
    return c


def test_overrides_are_typed_by_the_field():
    c = apply_overrides(
        _config(),
        ["train.steps=20", "train.lr=3", "train.flag=true", "train.name=b",
         "model.mult=(1,2,4)", "model.classes=10", "train.steps=30"],
    )
    assert c.train.steps == 30  # the last of repeated keys wins
    assert isinstance(c.train.lr, float) and c.train.lr == 3.0
    assert c.train.flag is True and c.train.name == "b"
    assert c.model.mult == (1, 2, 4) and c.model.classes == 10


def test_optional_fields_take_none_and_back():
    c = apply_overrides(_config(), ["model.classes=10"])
    assert c.model.classes == 10
    c = apply_overrides(c, ["model.classes=None", "model.mult=None"])
    assert c.model.classes is None and c.model.mult is None


def test_kwargs_dicts_take_new_keys_other_dicts_do_not():
    c = apply_overrides(_config(), ["data.kwargs.path=/some/dir", "data.kwargs.grayscale=true",
                                    "data.kwargs.value_range=(0, 255)", "data.kwargs.size=16"])
    assert c.data.kwargs.to_dict() == {"path": "/some/dir", "grayscale": True,
                                       "value_range": (0, 255), "size": 16}
    with pytest.raises(UsageError, match="unknown config key 'data.root'"):
        apply_overrides(_config(), ["data.root=/x"])
    with pytest.raises(UsageError, match="unknown config key 'data.kwargs.a.b'"):
        apply_overrides(_config(), ["data.kwargs.a.b=1"])


def test_bad_overrides():
    with pytest.raises(UsageError, match="unknown config key 'train.stpes'.*did you mean 'steps'"):
        apply_overrides(_config(), ["train.stpes=3"])
    with pytest.raises(UsageError, match="'config' has no 'trian'.*did you mean 'train'"):
        apply_overrides(_config(), ["trian.steps=3"])
    with pytest.raises(UsageError, match="key.path=value"):
        apply_overrides(_config(), ["train.steps"])
    with pytest.raises(UsageError, match="config.train.steps=ten"):
        apply_overrides(_config(), ["train.steps=ten"])
    with pytest.raises(UsageError, match="config.train.flag=maybe"):
        apply_overrides(_config(), ["train.flag=maybe"])


def test_parse_args_and_load_config(tmp_path):
    config, workdir = parse_args(
        ["--workdir", str(tmp_path), "--config.train.steps=7"], "experiments.train", "x"
    )
    assert config.train.steps == 7 and workdir == str(tmp_path)
    config, workdir = parse_args(["--config.train.steps", "9", "--config.model.num_classes",
                                  "None"], "experiments.train", "x")
    assert config.train.steps == 9 and workdir == os.path.join("runs", "train")
    assert config.model.num_classes is None
    f = tmp_path / "cfg.py"
    f.write_text("import ml_collections\n"
                 "def get_config():\n    return ml_collections.ConfigDict({'a': 1, 'name': 'f'})\n")
    assert load_config(str(f)).a == 1
    config, workdir = parse_args([f"--config={f}", "--config.a=5"], "experiments.train", "x")
    assert config.a == 5 and workdir == os.path.join("runs", "f")
    config, _ = parse_args(["--config", "experiments.train"], "experiments.quickstart", "x")
    assert config.name == "train"
    with pytest.raises(UsageError, match="does not exist"):
        load_config(str(tmp_path / "missing.py"))


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--steps=3"], "Unknown command line flag 'steps'"),
        (["stray"], "unexpected argument 'stray'"),
        (["--config.train.stpes=3"], "'train' has no 'stpes'"),
        (["--config.train.steps=ten"], "--config.train.steps=ten"),
        (["--config.train.log_every=0"], "config.train.log_every must be an int >= 1; got 0"),
        (["--config", "experiments.nope"], "no module 'experiments.nope'"),
        (["--config.data.name=folder", "--config.data.kwargs.root=/tmp"],
         "config.data.kwargs.root is not an argument of data.name='folder'"),
    ],
)
def test_mistakes_print_one_line_and_exit_2(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        train_cmd.main(argv)
    assert e.value.code == 2
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out.err


def test_help_exits_0_and_lists_the_config(capsys):
    with pytest.raises(SystemExit) as e:
        train_cmd.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--config.key.path=value" in out and "log_every" in out


def test_command_line_typo_in_a_subprocess_has_no_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--workdir", str(tmp_path),
         "--config.optim.learning_rate=-1"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 2
    err = [line for line in out.stderr.splitlines() if line.strip()]
    assert err == ["error: config.optim.learning_rate must be a number > 0; got -1.0"], out.stderr
    assert not os.listdir(tmp_path)  # nothing was done


# every field of base_config with a bad value, and the text the error must contain
BAD_FIELDS = [
    ("seed", -1), ("name", ""),
    ("data.name", "cifar"), ("data.test_fraction", 1.0), ("data.test_fraction", -0.1),
    ("data.split_seed", 0.5), ("data.kwargs.root", "/x"),
    ("model.preset", "huge"), ("model.dtype", "float8"), ("model.num_classes", 0),
    ("model.label_dropout", 1.5), ("model.base_channels", 0), ("model.channel_mult", ()),
    ("model.channel_mult", (1, 0)), ("model.num_res_blocks", 0),
    ("model.attn_resolutions", (-4,)), ("model.dropout", 1.0), ("model.extra_in_channels", -1),
    ("diffusion.schedule", "quadratic"), ("diffusion.num_steps", 0),
    ("diffusion.prediction", "score"), ("diffusion.weighting", "snr"),
    ("diffusion.time_sampler", "beta"), ("diffusion.preconditioning", "vp"),
    ("diffusion.sigma_data", 0.0),
    ("optim.learning_rate", 0.0), ("optim.learning_rate", float("nan")),
    ("optim.warmup_steps", -1), ("optim.weight_decay", -0.1), ("optim.clip_norm", 0.0),
    ("optim.ema_decay", 1.0), ("optim.ema_decay", -0.5), ("optim.schedule", "exponential"),
    ("train.steps", -1), ("train.steps", 0), ("train.steps", 2.5), ("train.batch_size", 0),
    ("train.batch_size", 12), ("train.log_every", 0), ("train.ckpt_every", 0),
    ("train.keep", 0), ("train.sample_every", -1), ("train.sample_steps", 0),
    ("train.num_sample_images", 0), ("train.steps", True), ("train.fast_compile", "yes"),
]


@pytest.mark.parametrize("key, value", BAD_FIELDS)
def test_each_bad_field_is_refused_before_any_work(key, value, monkeypatch, tmp_path):
    config = base_config()
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    with config.unlocked():  # a new value of any type, as a config file could set it
        if leaf in node:
            del node[leaf]
        node[leaf] = value
    loaded = []
    monkeypatch.setattr(_runner, "make_dataset", lambda *a, **k: loaded.append(a))
    name = "config.data.kwargs" if key.startswith("data.kwargs") else f"config.{key}"
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        train_denoiser(config, str(tmp_path / "run"), progress=False)
    assert loaded == [] and not (tmp_path / "run").exists()  # no data loaded, nothing written


def test_the_defaults_are_valid():
    validate_config(base_config())
    validate_config(train_cmd.get_config())
    bad = base_config()
    del bad["train"]
    with pytest.raises(ConfigError, match="train"):
        validate_config(bad)


def test_data_path_must_exist(tmp_path):
    config = base_config()
    config.data.name = "npz"
    config.data.kwargs.path = str(tmp_path / "missing.npz")
    with pytest.raises(ConfigError, match="config.data.kwargs.path must be an existing file"):
        validate_config(config)


# The README's bring-your-own-data commands, for two steps, with a tiny U-Net.
TINY = ["--config.train.steps=2", "--config.train.batch_size=8", "--config.train.log_every=1",
        "--config.train.ckpt_every=2", "--config.train.sample_every=0",
        "--config.model.base_channels=8", "--config.model.channel_mult=(1,)",
        "--config.model.attn_resolutions=()", "--config.optim.warmup_steps=0",
        "--config.train.fast_compile"]


def _steps_in_metrics(workdir) -> list[int]:
    from experiments._io import read_jsonl

    return [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


def test_readme_folder_command_trains(tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), np.uint8)).save(images / f"{i}.png")
    workdir = str(tmp_path / "run")
    train_cmd.main(["--workdir", workdir, "--config.model.num_classes=None",
                    "--config.data.name=folder", f"--config.data.kwargs.path={images}", *TINY])
    assert "trained 2 steps" in capsys.readouterr().out
    assert _steps_in_metrics(workdir) == [1, 2]
    assert os.listdir(os.path.join(workdir, "checkpoints"))


def test_readme_npz_command_trains_class_conditional(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, x=rng.integers(0, 256, (16, 8, 8, 1), np.uint8), y=np.arange(16) % 3)
    workdir = str(tmp_path / "run")
    train_cmd.main(["--workdir", workdir, "--config.model.num_classes=3",
                    "--config.data.name=npz", f"--config.data.kwargs.path={path}", *TINY])
    assert "trained 2 steps" in capsys.readouterr().out
    assert _steps_in_metrics(workdir) == [1, 2]
    # labels are required by a class-conditional model: one line, no traceback
    np.savez(path, x=rng.integers(0, 256, (16, 8, 8, 1), np.uint8))
    with pytest.raises(SystemExit) as e:
        train_cmd.main(["--workdir", str(tmp_path / "run2"), "--config.model.num_classes=3",
                        "--config.data.name=npz", f"--config.data.kwargs.path={path}", *TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no labels" in err[0] and "num_classes=None" in err[0]


def _readme_train_commands() -> list[list[str]]:
    import pathlib
    import shlex

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Training from the command line", 1)[1].split("\n## ", 1)[0]
    joined = section.replace("\\\n", " ")
    return [shlex.split(line)[3:] for line in joined.splitlines()
            if line.startswith("python -m experiments.train")]


def test_readme_commands_parse_and_validate(tmp_path, monkeypatch):
    from PIL import Image

    from experiments._cli import parse_config_args

    images = tmp_path / "path" / "to" / "images" / "a"
    images.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "0.png")
    np.savez(tmp_path / "data.npz", x=np.zeros((8, 8, 8, 1), np.uint8))
    monkeypatch.chdir(tmp_path)
    commands = _readme_train_commands()
    assert len(commands) == 4
    sources = set()
    for argv in commands:
        config, workdir = parse_config_args(argv, "experiments.train")
        validate_config(config)
        sources.add(config.data.name)
        if config.data.name != "digits":
            assert os.path.exists(config.data.kwargs.path)
    assert sources == {"digits", "folder", "npz"}


def test_npz_data_of_the_wrong_shape_is_one_clear_line(tmp_path, capsys):
    cases = {
        "flat": (np.zeros((16, 64), np.uint8), "shape (N, H, W, C)"),
        "five": (np.zeros((16, 8, 8, 1, 1), np.uint8), "has 5 dimensions"),
        "nchw": (np.zeros((16, 3, 8, 8), np.uint8), "looks channels-first (NCHW)"),
    }
    for name, (x, expected) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, x=x)
        with pytest.raises(SystemExit) as e:
            train_cmd.main(["--workdir", str(tmp_path / name), "--config.model.num_classes=None",
                            "--config.data.name=npz", f"--config.data.kwargs.path={path}",
                            *TINY])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and str(path) in err[0], (name, err)
        if name == "nchw":
            assert "channels_first=True" in err[0]
    # without the resize the training driver checks the images itself
    from experiments._runner import ConfigError, _check_images
    from experiments.train import get_config

    config = get_config()
    for x, expected in ((np.zeros((4, 3, 8, 8)), "look channels-first (NCHW); pass "
                         "--config.data.kwargs.channels_first=True"),
                        (np.zeros((4, 8)), "got 2 dimensions"),
                        (np.zeros((4, 8, 6, 1)), "must be square")):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            _check_images(x, config)


def test_a_file_that_is_not_an_npz_archive_is_named_as_such(tmp_path):
    from dpm.data import load_npz

    path = tmp_path / "notes.npz"
    path.write_text("these are not arrays\n")
    with pytest.raises(ValueError, match=r"is not an \.npz archive .* first bytes are b'these '"):
        load_npz(path)
