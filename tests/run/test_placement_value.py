"""The Placement value for every strategy, from a recipe and a fake launch (no process is started)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from launcher.config.errors import UserError
from launcher.config.recipe import load_recipe
from launcher.run import placement

GPU_NODE = placement.Machine(gpus=2, gpu_memory_gb=80.0)


def launched(kind: str, *, stage: int = 0, offload: bool = False, fsdp2: bool = True, ram_efficient: bool = True):
    """What an Accelerator looks like to placement.resolve after `accelerate launch` with a config."""
    state = SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=None)
    if kind == "DEEPSPEED":
        device = "cpu" if offload else "none"
        state.deepspeed_plugin = SimpleNamespace(
            zero_stage=stage, deepspeed_config={"zero_optimization": {"offload_param": {"device": device}}}
        )
    if kind == "FSDP":
        state.fsdp_plugin = SimpleNamespace(
            activation_checkpointing=False,
            cpu_ram_efficient_loading=ram_efficient,
            cpu_offload=SimpleNamespace(offload_params=offload),
            fsdp_version=2 if fsdp2 else 1,
        )
    return SimpleNamespace(
        distributed_type=SimpleNamespace(value=kind), state=state, is_fsdp2=fsdp2, device=torch.device("cuda", 1)
    )


def resolve(monkeypatch, strategy: str, accelerator, world: int = 2, *overrides):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    recipe = load_recipe(None, [f"dist.strategy={strategy}", f"dist.nproc={world}", *overrides])
    return placement.resolve(recipe, accelerator, {}, GPU_NODE)


DEVICE = torch.device("cuda", 1)
# strategy, launch, expected fields (device_map, storage, upcast, optimizer after substitution, ...)
CASES = [
    (
        "single",
        launched("NO"),
        1,
        dict(
            zero_stage=0,
            fsdp_version=0,
            rank0_reads=False,
            offload=False,
            device_map="auto",
            storage_dtype=torch.uint8,
            kbit_upcast=True,
            optimizer="paged_adamw_32bit",
        ),
    ),
    (
        "ddp",
        launched("MULTI_GPU"),
        2,
        dict(
            zero_stage=0,
            fsdp_version=0,
            rank0_reads=False,
            device_map={"": DEVICE},
            storage_dtype=torch.uint8,
            kbit_upcast=True,
        ),
    ),
    (
        "zero2",
        launched("DEEPSPEED", stage=2),
        2,
        dict(zero_stage=2, rank0_reads=False, device_map={"": DEVICE}, storage_dtype=torch.uint8, kbit_upcast=True),
    ),
    (
        "zero3",
        launched("DEEPSPEED", stage=3),
        2,
        dict(
            zero_stage=3,
            rank0_reads=True,
            offload=False,
            device_map=None,
            storage_dtype=torch.float32,
            kbit_upcast=False,
            optimizer="paged_adamw_32bit",
        ),
    ),
    (
        "zero3_offload",
        launched("DEEPSPEED", stage=3, offload=True),
        2,
        dict(zero_stage=3, rank0_reads=True, offload=True, device_map=None, optimizer="adamw_torch"),
    ),
    (
        "fsdp",
        launched("FSDP"),
        2,
        dict(
            fsdp_version=2,
            rank0_reads=True,
            offload=False,
            device_map=None,
            storage_dtype=torch.float32,
            kbit_upcast=False,
            optimizer="adamw_torch",
        ),
    ),
    (
        "fsdp_offload",
        launched("FSDP", offload=True),
        2,
        dict(fsdp_version=2, offload=True, device_map=None, optimizer="adamw_torch"),
    ),
]


@pytest.mark.parametrize("strategy,accelerator,world,expected", CASES, ids=[c[0] for c in CASES])
def test_placement_for_each_strategy(monkeypatch, strategy, accelerator, world, expected):
    with (
        pytest.warns(UserWarning, match="replaced by adamw_torch")
        if expected.get("optimizer") == "adamw_torch"
        else contextlib.nullcontext()
    ):
        pl = resolve(monkeypatch, strategy, accelerator, world)
    assert pl.strategy == strategy and pl.rank == 1 and pl.world == world
    assert pl.param_dtype == torch.float32  # auto compute dtype on a machine without CUDA
    for field, value in expected.items():
        assert getattr(pl, field) == value, field
    assert pl.deepspeed == (pl.zero_stage > 0)
    assert pl.zero3_rank0_reads == (strategy.startswith("zero3"))
    assert pl.fsdp2_rank0_reads == (strategy.startswith("fsdp"))


def test_fsdp1_keeps_bitsandbytes_optimizers_and_every_rank_reads(monkeypatch):
    pl = resolve(monkeypatch, "fsdp", launched("FSDP", fsdp2=False), 2, "dist.fsdp_version=1")
    assert pl.fsdp_version == 1 and not pl.rank0_reads and pl.optimizer == "paged_adamw_32bit"


def test_one_rank_reads_only_when_there_are_several(monkeypatch):
    assert not resolve(monkeypatch, "zero3", launched("DEEPSPEED", stage=3), 1).rank0_reads
    assert not resolve(monkeypatch, "fsdp", launched("FSDP", ram_efficient=False), 2).rank0_reads


@pytest.mark.parametrize(
    "strategy,accelerator",
    [
        ("zero3", launched("MULTI_GPU")),
        ("ddp", launched("DEEPSPEED", stage=3)),
        ("fsdp", launched("DEEPSPEED", stage=2)),
    ],
)
def test_a_launch_that_is_not_the_recipes_strategy_is_refused(monkeypatch, strategy, accelerator):
    with pytest.raises(UserError, match="dist.strategy: the recipe says"):
        resolve(monkeypatch, strategy, accelerator)


def test_the_placement_is_frozen(monkeypatch):
    pl = resolve(monkeypatch, "ddp", launched("MULTI_GPU"))
    with pytest.raises(AttributeError):
        pl.strategy = "fsdp"
