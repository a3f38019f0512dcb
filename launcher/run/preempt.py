"""Stopping cleanly when the job must end: checkpoint at the next step boundary, then exit.

Slurm sends USR2 ahead of the time limit (`--signal`, set by submitit) to every process of
the job, and SIGTERM on preemption or scancel. Each training rank records the signal; at
the end of every optimizer step the ranks agree (any rank signalled means all stop), save a
checkpoint together and leave `interrupted.json` in the run directory. A signal that reaches
only the Slurm task (or arrives while the ranks are still starting) is passed on through a
`stop_requested` file that the ranks also look for. Whoever launched the
run (the Slurm job, or a user) reads that file to tell an interruption from the end; the
requeued run resumes from the newest complete checkpoint on disk.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only
    from accelerate import Accelerator

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
MARKER = "interrupted.json"
REQUEST = "stop_requested"
UNDER_JOB = "LAUNCHER_SLURM_TASK"  # set by the Slurm task for its launch: it owns the stop request file


class StopRequest:
    """Records a stop signal; `agreed()` asks every rank at a step boundary."""

    def __init__(self, run_dir: Path):
        self.signum: int | None = None
        self.request_file = Path(run_dir) / REQUEST
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in SIGNALS:
                signal.signal(s, self._record)

    def _record(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self, accelerator: Accelerator, world: int) -> bool:
        """True on every rank once any rank has been signalled (one small all-reduce per step)."""
        asked = self.signum is not None or self.request_file.exists()
        local = torch.tensor(float(asked), device=accelerator.device)
        if world == 1:
            return bool(local.item())
        return accelerator.reduce(local, reduction="sum").item() > 0


def request(run_dir: Path) -> None:
    """Ask a running training to stop at its next step (what the Slurm task does on USR2)."""
    (Path(run_dir) / REQUEST).touch()


def mark(run_dir: Path, step: int, signum: int | None) -> None:
    name = signal.Signals(signum).name if signum else "a signal on another rank"
    (run_dir / MARKER).write_text(json.dumps({"step": step, "signal": name}))


def clear(run_dir: Path) -> None:
    """A new attempt starts: forget the last one's interruption and stop request."""
    (Path(run_dir) / MARKER).unlink(missing_ok=True)
    (Path(run_dir) / REQUEST).unlink(missing_ok=True)


def interrupted(run_dir: Path) -> dict | None:
    """What the last run left: {"step", "signal"} when it stopped early, else None."""
    path = Path(run_dir) / MARKER
    return json.loads(path.read_text()) if path.exists() else None
