"""Checkpoints: accelerate's save_state into step folders, adapter weights only, newest complete wins.

A checkpoint counts only once its COMPLETE marker exists, so a job killed mid-save resumes
from the previous one. The frozen 4-bit base is never written: only trainable tensors
(the adapter) go into the model file, plus optimizer, scheduler, RNG and progress state.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from launcher.config.errors import UserError

MARKER = "COMPLETE"


class Progress:
    """Where the run stands; registered with accelerate so save_state/load_state carry it."""

    def __init__(self):
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batches_in_epoch = 0  # micro batches this rank consumed in `epoch`
        self.restarts = 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Never silently train over an earlier run's checkpoints or metrics."""
    if not resume and ((run_dir / "metrics.jsonl").exists() or list_complete(run_dir)):
        raise UserError(
            f"train.output_dir: {run_dir} already holds a run; add --resume to continue it, "
            "or choose another train.output_dir"
        )


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_complete(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / MARKER).exists()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def newest(run_dir: Path) -> Path | None:
    done = list_complete(run_dir)
    return done[-1] if done else None


def trainable_only_hook(models, weights, output_dir):
    """save_state pre-hook: keep only trainable tensors of each model (the adapter)."""
    for model, state in zip(models, weights):
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        for key in [k for k in state if k not in keep]:
            del state[key]


def save(accelerator, run_dir: Path, step: int, keep: int, extra: dict, deepspeed: bool = False) -> Path:
    path = checkpoint_root(run_dir) / f"step_{step:07d}"
    # DeepSpeed writes its own model file: leave the frozen base out of it too.
    kwargs = {"exclude_frozen_parameters": True} if deepspeed else {}
    accelerator.save_state(str(path), **kwargs)
    if accelerator.is_main_process:
        (path / "progress.json").write_text(json.dumps(extra, indent=1))
        (path / MARKER).write_text("")
        for old in list_complete(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def load(accelerator, path: Path, deepspeed: bool = False) -> None:
    # not strict: the checkpoint holds only the adapter, the base comes from the model files
    kwargs = {"load_module_strict": False} if deepspeed else {"strict": False}
    accelerator.load_state(str(path), **kwargs)
