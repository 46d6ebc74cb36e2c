import pytest
import torch
from omegaconf import OmegaConf

from kdtune.config import instantiate, resolve_component, validate
from kdtune.config.registry import COMPONENTS
from kdtune.errors import KDTuneError


class Outer:
    def __init__(self, inner, scale: float = 1.0, items=()):
        self.inner, self.scale, self.items = inner, scale, items


class Inner:
    def __init__(self, value: int):
        self.value = value


HERE = __name__


def test_nested_instantiation_with_positional_args_and_interpolation():
    cfg = OmegaConf.create({
        "base": 3,
        "thing": {
            "_component_": f"{HERE}.Outer",
            "inner": {"_component_": f"{HERE}.Inner", "value": "${base}"},
            "items": [{"_component_": f"{HERE}.Inner", "value": 7}, 8],
        },
        "optimizer": {"_component_": "adamw", "lr": 0.01},
    })
    thing = instantiate(cfg.thing, scale=2.0)
    assert isinstance(thing.inner, Inner) and thing.inner.value == 3 and thing.scale == 2.0
    assert thing.items[0].value == 7 and thing.items[1] == 8
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = instantiate(cfg.optimizer, params)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 0.01


def test_registry_short_names_and_dotted_paths():
    assert resolve_component("adamw") is torch.optim.AdamW
    assert resolve_component("torch.optim.SGD") is torch.optim.SGD
    with pytest.raises(KDTuneError, match="cannot resolve component 'adamww': not a registry short name; did you "
                                          "mean 'adamw'"):
        resolve_component("adamww")
    with pytest.raises(KDTuneError, match="cannot resolve component 'no.such.thing': not a registry short name, and "
                                          "no module 'no' in .* or the installed packages"):
        resolve_component("no.such.thing")
    with pytest.raises(KDTuneError, match=r"module 'torch.optim' \(.*torch/optim/__init__.py\) has no callable "
                                          "'AdamWW'"):
        resolve_component("torch.optim.AdamWW")


def test_every_registered_component_resolves():
    for name in COMPONENTS:
        assert callable(resolve_component(name)), name


def test_argument_that_does_not_bind_names_the_node():
    cfg = OmegaConf.create({"thing": {"_component_": f"{HERE}.Inner", "valeu": 1}})
    with pytest.raises(KDTuneError, match=r"thing: '.*Inner' takes no argument 'valeu'; did you mean 'value'"):
        instantiate(cfg.thing)


def test_validate_binds_partially():
    good = OmegaConf.create({"optimizer": {"_component_": "adamw", "lr": 1e-3},
                             "nested": {"x": {"_component_": f"{HERE}.Inner", "value": 1}}})
    assert validate(good) == 2  # params are passed by the recipe at run time: not an error
    missing = OmegaConf.create({"thing": {"_component_": f"{HERE}.Inner"}})
    with pytest.raises(KDTuneError, match="missing a required argument: 'value'"):
        instantiate(missing.thing)
    bad = OmegaConf.create({"optimizer": {"_component_": "adamw", "lr": 1e-3, "betas2": 0.9}})
    with pytest.raises(KDTuneError, match=r"optimizer: 'adamw' takes no argument 'betas2'; did you mean 'betas'"):
        validate(bad)
