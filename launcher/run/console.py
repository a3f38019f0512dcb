"""What a run says on the console: the launcher's own lines, with third-party noise kept out.

Three levels, set by `launcher train --quiet` / `-v` and inherited by every rank a run starts
(through LAUNCHER_VERBOSITY):

- quiet: errors and the final result only;
- normal: what is loading, a progress bar with loss and accuracy, each eval, where everything was
  written and what to run next;
- verbose: also the data statistics and every library's own warnings, logs and progress bars, unfiltered.

Only messages that say nothing to the user are silenced at normal level, each for a stated reason;
transformers' and peft's real warnings still show.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

QUIET, NORMAL, VERBOSE = 0, 1, 2
ENV = "LAUNCHER_VERBOSITY"


def level() -> int:
    try:
        return int(os.environ.get(ENV, NORMAL))
    except ValueError:
        return NORMAL


def set_level(value: int) -> None:
    os.environ[ENV] = str(value)


def is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def say(message: str, at: int = NORMAL) -> None:
    """Print on rank 0 when the level is at least `at`."""
    if is_main() and level() >= at:
        print(message, flush=True)


def quiet_libraries() -> None:
    """At quiet and normal level, silence what says nothing to the user:
    - bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" at import: that
      kernel serves the AVX512-BF16 path the launcher switches off (model.one_4bit_format);
    - transformers' "Loading weights" progress bar: the launcher says what it loads in one line;
    - DeepSpeed's "Setting accelerator to CPU" warning, when something imports DeepSpeed on a machine
      without CUDA (transformers' save_pretrained does, through accelerate): naming the CPU in its own
      DS_ACCELERATOR switch is what that warning asks for;
    - torch's FutureWarning that `all_gather_into_tensor` / `reduce_scatter_tensor` are deprecated, which
      its c10d logger repeats on every collective DeepSpeed ZeRO-3 makes (23,000 lines in a 2-process demo).
    """
    if level() >= VERBOSE:
        return
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def bar_interval() -> float:
    """Seconds between progress-bar redraws: live on a terminal, a line a minute in a log file."""
    return 0.1 if sys.stderr.isatty() else 60.0


def data_line(path: str, stats: dict) -> str:
    """The data in one line: what was read, how it splits, what was dropped."""
    if stats.get("streaming"):
        return f"data: streaming {path}"
    dropped = stats["dropped_empty"] + stats["dropped_too_long"]
    return (
        f"data: {path} ({stats['format']}): {stats['train_samples']} train, {stats['eval_samples']} eval"
        + (f", {dropped} dropped" if dropped else "")
        + (f", {stats['truncated']} truncated" if stats["truncated"] else "")
        + f" (tokenized cache {stats['cache']})"
    )


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


def final_report(summary: dict, run_dir, prompts: int) -> list[str]:
    """The end of a run in a few lines: what it learned, where it went, what to run next."""
    import shlex

    run = str(run_dir)
    lines = [f"done: {summary['steps']} steps in {summary['train_loop_s']:.0f} s"]
    if summary.get("eval_loss") is not None and summary.get("first_eval_loss") is not None:
        lines.append(f"  eval loss      {summary['first_eval_loss']:.3f} -> {summary['eval_loss']:.3f}")
    if summary.get("eval_accuracy") is not None and summary.get("first_eval_accuracy") is not None:
        lines.append(
            f"  eval accuracy  {_pct(summary['first_eval_accuracy'])} -> {_pct(summary['eval_accuracy'])} "
            f"(exact match, {prompts} held-out prompts)"
        )
    example = summary.get("eval_example")
    if example:
        verdict = "right" if example["answer"] == example["expected"] else f"expected {example['expected']!r}"
        lines.append(f"  for example    {example['prompt']!r} -> {example['answer']!r} ({verdict})")
    lines.append(f"wrote {run}/: adapter_model.safetensors, metrics.jsonl, loss.png, summary.json, checkpoints/")
    prompt = example["prompt"] if example else "..."
    lines.append("next:")
    lines.append(f"  launcher generate {shlex.quote(run)} --prompt {shlex.quote(prompt)}")
    lines.append(f"  launcher merge {shlex.quote(run)} {shlex.quote(run.rstrip('/') + '-merged')}")
    return lines
