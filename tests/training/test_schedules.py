import io
import math

import pytest
import torch
from omegaconf import OmegaConf

from kdtune.config.instantiate import instantiate
from kdtune.errors import KDTuneError
from kdtune.training.schedules import get_cosine_schedule_with_warmup

BASE_LR = 3e-4


def closed_form(step, warmup, total, cycles=0.5):
    """Independent statement of the schedule: linear warmup, then cosine over the remaining steps."""
    if step < warmup:
        return BASE_LR * step / warmup
    p = min(step - warmup, total - warmup) / (total - warmup)
    return BASE_LR * max(0.0, (1 + math.cos(math.pi * 2 * cycles * p)) / 2)


def make(warmup, total, **kwargs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=BASE_LR)
    return opt, get_cosine_schedule_with_warmup(opt, warmup, total, **kwargs)


def lrs(opt, sched, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("warmup,total,cycles", [(10, 100, 0.5), (0, 50, 0.5), (5, 40, 1.0), (3, 30, 0.75)])
def test_matches_closed_form(warmup, total, cycles):
    opt, sched = make(warmup, total, num_cycles=cycles)
    got = lrs(opt, sched, total + 5)
    for step in range(total + 5):
        assert got[step] == pytest.approx(closed_form(step, warmup, total, cycles), abs=1e-12), step


def test_shape_landmarks():
    opt, sched = make(10, 110)
    got = lrs(opt, sched, 120)
    assert got[0] == 0.0
    assert got[5] == pytest.approx(BASE_LR / 2)
    assert got[10] == pytest.approx(BASE_LR)
    assert got[60] == pytest.approx(BASE_LR / 2)  # half way through the decay
    assert got[110] == pytest.approx(0.0, abs=1e-15)
    assert got[119] == pytest.approx(0.0, abs=1e-15)  # stays at 0 past the end


def test_resume_from_state_dict_continues_identically():
    opt, sched = make(4, 30)
    uninterrupted = lrs(opt, sched, 30)

    opt, sched = make(4, 30)
    first = lrs(opt, sched, 12)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    opt, sched = make(4, 30)
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    assert first + lrs(opt, sched, 18) == uninterrupted


@pytest.mark.parametrize("warmup,total,key", [(-1, 10, "num_warmup_steps"), (0, 0, "num_training_steps")])
def test_bad_arguments_name_the_key(warmup, total, key):
    with pytest.raises(KDTuneError, match=key):
        make(warmup, total)


def test_registry_short_name():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=BASE_LR)
    node = OmegaConf.create({"lr_scheduler": {"_component_": "cosine_with_warmup", "num_warmup_steps": 2}})
    sched = instantiate(node.lr_scheduler, opt, num_training_steps=10)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    assert opt.param_groups[0]["lr"] == 0.0


def test_linear_schedule_values_and_resume():
    from kdtune.training.schedules import LinearSchedule

    schedule = LinearSchedule(0.0, 0.6, num_steps=4)
    values = []
    for _ in range(6):
        values.append(schedule.value)
        schedule.step()
    # a run of num_steps steps (value read, then step()) trains its first at start and its last at end
    assert values == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.6, 0.6])
    one = LinearSchedule(0.0, 0.6, num_steps=1)
    assert one.value == pytest.approx(0.6)
    resumed = LinearSchedule(0.0, 0.6, num_steps=4)
    resumed.load_state_dict(torch.load(io.BytesIO(_saved(schedule.state_dict())), weights_only=True))
    assert resumed.value == schedule.value == pytest.approx(0.6)


def _saved(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()
