"""Placement: which strategy runs, where each rank loads the model, and who this rank is.

One resolver so `device_map` is right by construction: `auto` for one process on GPUs,
the rank's own device for DDP, never one under sharded strategies.
"""

from __future__ import annotations

import os

from launcher.errors import UserError
from launcher.recipe import DistCfg

SHARDED = ("zero3", "zero3_offload", "fsdp", "fsdp_offload")
IMPLEMENTED = ("single", "ddp")


def resolve_strategy(dist: DistCfg) -> str:
    strategy = dist.strategy
    if strategy == "auto":
        strategy = "single" if dist.nproc * dist.nnodes == 1 else "ddp"
    if strategy not in IMPLEMENTED:
        raise UserError(f"dist.strategy: {strategy} is not available in this version; use single or ddp")
    return strategy


def rank_and_world() -> tuple[int, int]:
    """Global rank and world size from torch.distributed (accelerate under DeepSpeed on CPU misreports them)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def device_map_for(strategy: str, accelerator):
    """The `device_map` for from_pretrained under this strategy and launch."""
    if strategy in SHARDED:
        return None  # ZeRO-3/FSDP place weights themselves; a device_map breaks them
    if accelerator.device.type == "cpu":
        return None  # CPU is from_pretrained's default placement
    if strategy == "single":
        return "auto"  # may spread a big model over the local GPUs (one busy at a time)
    return {"": accelerator.device}  # DDP/ZeRO-1/2: a full replica on this rank's own GPU


def kbit_upcast(strategy: str) -> bool:
    """prepare_model_for_kbit_training's fp32 upcast breaks flattening under sharding."""
    return strategy not in SHARDED
