import pytest
from omegaconf import OmegaConf

from kdtune.config import apply_overrides, load_config
from kdtune.errors import KDTuneError
from tests.cli_utils import ASSETS


def _cfg():
    return OmegaConf.create(
        {"output_dir": "/tmp/x", "kd_ratio": 0.5, "batch_size": 2,
         "optimizer": {"_component_": "adamw", "lr": 1e-3},
         "loggers": ["a", "b"]}
    )


def test_load_yaml_path_and_interpolation():
    cfg = load_config(str(ASSETS / "echo.yaml"), ["lr=0.5"])
    assert cfg.optimizer.lr == 0.5  # ${lr} follows the override


def test_override_types_are_parsed_like_yaml():
    cfg = apply_overrides(_cfg(), ["kd_ratio=0.25", "batch_size=8", "output_dir=/data/run1", "optimizer.lr=1e-4",
                                   "loggers=[c]"])
    assert cfg.kd_ratio == 0.25 and cfg.batch_size == 8 and cfg.output_dir == "/data/run1"
    assert cfg.optimizer.lr == pytest.approx(1e-4)
    assert list(cfg.loggers) == ["c"]


def test_add_and_remove_keys():
    cfg = apply_overrides(_cfg(), ["+compile=true", "+optimizer.weight_decay=0.1", "~batch_size", "~optimizer.lr"])
    assert cfg.compile is True and cfg.optimizer.weight_decay == 0.1
    assert "batch_size" not in cfg and "lr" not in cfg.optimizer


def test_component_replacement():
    cfg = apply_overrides(_cfg(), ["optimizer=adamw_8bit"])
    assert cfg.optimizer._component_ == "adamw_8bit" and cfg.optimizer.lr == 1e-3


def test_typo_suggests_the_nearest_key():
    with pytest.raises(KDTuneError, match=r"kd_ration=0.3.*no key 'kd_ration'.*did you mean 'kd_ratio'"):
        apply_overrides(_cfg(), ["kd_ration=0.3"])
    with pytest.raises(KDTuneError, match="did you mean 'optimizer.lr'"):
        apply_overrides(_cfg(), ["optimizer.lrr=1"])


@pytest.mark.parametrize("bad, fragment", [
    ("kd_ratio", "must look like key=value"),
    ("+kd_ratio=1", "exists already"),
    ("~nothing", "no key 'nothing'"),
    ("batch_size=[1", "cannot parse value"),
])
def test_bad_overrides(bad, fragment):
    with pytest.raises(KDTuneError, match=fragment):
        apply_overrides(_cfg(), [bad])


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(KDTuneError, match="bad.yaml' is not valid YAML"):
        load_config(str(bad))
    with pytest.raises(KDTuneError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
