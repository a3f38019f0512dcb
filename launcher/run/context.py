"""The run context: what the phases of a run hand each other, made once and read after.

`train.train` builds it in set-up (accelerator, placement, run directory, progress, stop request),
fills in the model, optimizer and scheduler as the model phase makes them, and hands the whole of it
to `loop.fit` and `train.finish`, instead of nine to eleven positional values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.config.recipe import Recipe
from launcher.run.checkpoint import Progress
from launcher.run.placement import Placement
from launcher.run.preempt import StopRequest
from launcher.run.watch import Watch

if TYPE_CHECKING:  # torch and accelerate: only for the annotations
    import torch
    from accelerate import Accelerator


@dataclass
class RunContext:
    recipe: Recipe
    accelerator: Accelerator
    placement: Placement
    run_dir: Path
    progress: Progress
    stop: StopRequest | None  # None where nothing can ask the step to stop (the trace)
    model: torch.nn.Module | None = None  # the prepared (wrapped) model, once the model phase has run
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    watch: Watch | None = None  # this rank's heartbeat (several processes)
