import ml_collections
import pytest

from experiments._cli import apply_overrides, load_config, parse_args


def _config():
    c = ml_collections.ConfigDict()
    c.train = ml_collections.ConfigDict(dict(steps=10, lr=1e-3, flag=False, name="a"))
    c.model = ml_collections.ConfigDict(dict(mult=(1, 2), classes=None))
    return c


def test_overrides_are_typed_by_the_field():
    c = apply_overrides(
        _config(),
        ["train.steps=20", "train.lr=3", "train.flag=true", "train.name=b",
         "model.mult=[1,2,4]", "model.classes=10"],
    )
    assert c.train.steps == 20 and isinstance(c.train.lr, float) and c.train.lr == 3.0
    assert c.train.flag is True and c.train.name == "b"
    assert c.model.mult == (1, 2, 4) and c.model.classes == 10


def test_bad_overrides():
    with pytest.raises(ValueError, match="unknown config key 'train.stpes'"):
        apply_overrides(_config(), ["train.stpes=3"])
    with pytest.raises(ValueError, match="key.path=value"):
        apply_overrides(_config(), ["train.steps"])
    with pytest.raises(ValueError, match="bad value for 'train.steps'"):
        apply_overrides(_config(), ["train.steps=ten"])
    with pytest.raises(ValueError, match="expected a boolean"):
        apply_overrides(_config(), ["train.flag=maybe"])


def test_parse_args_and_load_config(tmp_path):
    config, workdir = parse_args(
        ["--workdir", str(tmp_path), "--config.train.steps=7"], "experiments.train", "x"
    )
    assert config.train.steps == 7 and workdir == str(tmp_path)
    with pytest.raises(ValueError, match="unknown argument"):
        parse_args(["--steps=3"], "experiments.train", "x")
    f = tmp_path / "cfg.py"
    f.write_text("import ml_collections\n"
                 "def get_config():\n    return ml_collections.ConfigDict({'a': 1})\n")
    assert load_config(str(f)).a == 1
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path / "missing.py"))
