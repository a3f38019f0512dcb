"""The resume contract: what a resumed run may change in its recipe, and what it may not.

`--resume` continues the run's newest intact checkpoint, which was trained under the run's own
`recipe.yaml`. A key that changes what the checkpoint holds or means (the model, its quantization, the
adapter's shape and targets, the data's content and order, the seed, the micro batch, accumulation
and world size, the optimizer and schedule) is refused, each named with its old and new value. A key
that only says how long to run, how often to log, evaluate and save, how much memory to use, or how
the job is submitted is accepted, with one line saying what changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from launcher.config.errors import count, listing
from launcher.config.recipe import Recipe
from launcher.config.userio import load_yaml, read_text

# Safe to change on resume. Everything else is refused: a key the schema gains later is refused until it
# is known to be safe, never silently accepted.
SAFE = frozenset(
    {
        "train.max_steps",  # extend (or shorten) the run; the schedule is rebuilt for the new length
        "train.epochs",
        "train.log_every",
        "train.eval_every",
        "train.eval_batches",
        "train.eval_accuracy_samples",
        "train.eval_max_new_tokens",
        "train.save_every",
        "train.keep_checkpoints",
        "train.report_to",
        "train.gradient_checkpointing",  # memory, not arithmetic: the same gradients
        "train.checkpoint_every",
        "train.memory_budget_gb",
        "train.chunked_loss",  # the same loss and gradients, in chunks
        "train.output_dir",  # the run directory is where the checkpoint is, whatever the recipe says
        "data.cache_dir",
        "data.num_proc",  # how many processes tokenize, not what they write
        "data.log_sample_ids",
        "model.attn_implementation",
        "model.device_map",
        "dist.timeout_s",
        "dist.max_restarts",
    }
)
SAFE_SECTIONS = ("slurm.",)  # how the job is submitted


def flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 2e-4, ...} from nested sections."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and not prefix:
            out.update(flat(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, accepted) lines for every key whose value differs. Keys the old recipe lacks (written
    by an earlier version) are not compared; `dist.strategy: auto` matches whatever it resolved to."""
    refused, accepted = [], []
    for key in sorted(new):
        if key not in old or old[key] == new[key]:
            continue
        if key == "dist.strategy" and "auto" in (old[key], new[key]):
            continue
        line = f"{key}: {_show(old[key])} -> {_show(new[key])}"
        if key in SAFE or key.startswith(SAFE_SECTIONS):
            accepted.append(line)
        else:
            refused.append(line)
    return refused, accepted


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def check(run_dir: Path, recipe: Recipe, say: Callable[[str], None]) -> None:
    """Refuse a resume whose recipe changes what the checkpoint means (one UserError listing every key);
    say in one line what else changed. No recipe.yaml yet (the run never started): nothing to compare."""
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        return
    old = flat(load_yaml(read_text(saved, "train.output_dir"), str(saved)) or {})
    refused, accepted = changes(old, flat(recipe.model_dump(mode="json")))
    if refused:
        raise listing(
            f"--resume: {count(len(refused), 'key')} changed since {saved} was trained, and the checkpoint "
            "cannot continue under them (set them back, or start a new run with another train.output_dir)",
            refused,
        )
    if accepted:
        say(f"resuming with changes: {'; '.join(accepted)}")
