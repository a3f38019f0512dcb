"""Every recipe optimizer builds and steps (bitsandbytes ones on CPU too); schedules have the right shape."""

import pytest
import torch

from launcher.config.recipe import TrainCfg
from launcher.run.optim import build_optimizer, build_scheduler, warmup_steps

OPTIMIZERS = ["paged_adamw_8bit", "paged_adamw_32bit", "paged_lion_8bit", "adamw_8bit", "adamw_torch"]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_steps(name):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4096, 8))  # >= 4096 elements so 8-bit state is really 8-bit
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    opt = build_optimizer([p, frozen], TrainCfg(optimizer=name, lr=1e-2))
    assert all(q is not frozen for g in opt.param_groups for q in g["params"])
    before = p.detach().clone()
    (p**2).sum().backward()
    opt.step()
    assert not torch.equal(before, p.detach())
    assert p.detach().norm() < before.norm()  # moved downhill


def _lrs(cfg, total):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_to_zero():
    cfg = TrainCfg(lr=1.0, warmup_steps=10, warmup_ratio=0.0, scheduler="cosine")
    lrs = _lrs(cfg, 110)
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.01


def test_constant_and_linear():
    assert set(_lrs(TrainCfg(lr=0.5, warmup_ratio=0.0, scheduler="constant"), 20)) == {0.5}
    lin = _lrs(TrainCfg(lr=1.0, warmup_ratio=0.0, scheduler="linear"), 10)
    assert lin[0] == 1.0 and lin[5] == pytest.approx(0.5)


def test_warmup_ratio_adds_to_steps():
    assert warmup_steps(TrainCfg(warmup_steps=5, warmup_ratio=0.1), 100) == 15
