"""Metrics: JSONL in the run directory, accelerate trackers (TensorBoard/W&B), loss-curve PNG."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:  # annotations only
    from accelerate import Accelerator


def process_age_s() -> float:
    """Seconds since this process started (imports included)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def host_rss_gb(peak: bool = False) -> float:
    """This process's resident set now (Linux /proc), or its peak so far."""
    if peak:
        return peak_memory_gb(torch.device("cpu"))
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA allocation on GPU; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class MetricsLog:
    """Appends one JSON object per line (append mode: a resumed run keeps its history)."""

    def __init__(self, path: Path, accelerator: Accelerator):
        self.path, self.accelerator = path, accelerator

    def write(self, row: dict) -> None:
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.accelerator.log(
            {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}, step=row["step"]
        )


def keep_rows(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite a JSONL log with only the rows `keep` accepts (atomically: a kill leaves the old file or
    the new one). A resumed run drops what it logged past its checkpoint, so each step appears once."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and keep(json.loads(line))]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in rows))
    os.replace(tmp, path)


def read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label, style in ((train, "train loss", "-"), (evals, "eval loss", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


class SampleIdLog:
    """Debug log of the sample ids one rank consumes, so coverage can be checked from outside."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool):
        self.file = None
        if enabled:
            (run_dir / "sample_ids").mkdir(parents=True, exist_ok=True)
            self.file = open(run_dir / "sample_ids" / f"rank{rank}.jsonl", "a")

    def write(self, row: dict) -> None:
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self, final: dict) -> None:
        if self.file:
            self.write(final)
            self.file.close()
