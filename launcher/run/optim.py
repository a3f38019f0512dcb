"""Optimizers (bitsandbytes paged / 8-bit, torch AdamW) and warmup + decay schedules."""

from __future__ import annotations

import math

import torch

from launcher.config.recipe import TrainCfg
from launcher.config.tables import OPTIMIZERS


def build_optimizer(params, cfg: TrainCfg, name: str | None = None, say=None) -> torch.optim.Optimizer:
    """`name` overrides cfg.optimizer (the placement may substitute one); `say` prints a note."""
    optimizer = OPTIMIZERS[name or cfg.optimizer]
    params = [p for p in params if p.requires_grad]
    if optimizer.bnb_class is None:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    import bitsandbytes as bnb

    cls = optimizer.bnb_class
    if cls.startswith("Paged") and params and params[0].device.type == "cpu":
        # Paged state lives in CUDA unified memory and only pays off on a GPU. On CPU take the unpaged
        # class outright (same update) rather than let bitsandbytes warn that it falls back.
        cls = cls.removeprefix("Paged")
        if say is not None:
            say(f"note: {optimizer.name} runs unpaged on CPU (paging only moves optimizer state off a GPU)")
    return getattr(bnb.optim, cls)(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def warmup_steps(cfg: TrainCfg, total: int) -> int:
    return min(total, cfg.warmup_steps + math.ceil(cfg.warmup_ratio * total))


def build_scheduler(optimizer, cfg: TrainCfg, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine/linear decay to 0 at `total`, or constant."""
    warm = warmup_steps(cfg, total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.scheduler == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
