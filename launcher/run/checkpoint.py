"""Checkpoints: accelerate's save_state into step folders, adapter weights only, newest intact wins.

Every rank writes into `.step_N.incomplete`; after all of them have finished (a barrier), rank 0
records a manifest (each file's size and SHA-256), marks it COMPLETE and renames the folder to
`step_N`, so a `step_N` folder is whole by construction and a job killed mid-save resumes from the
previous one. On resume the newest is checked against its manifest; a damaged one (a file cut short,
changed or gone) is named in one line and the previous intact one is used. Rotation keeps the newest
`keep` and never deletes the one just verified. The frozen 4-bit base is never written: only
trainable tensors (the adapter) go into the model file, plus optimizer, scheduler, RNG and progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from launcher.config import userio
from launcher.config.errors import UserError, listing
from launcher.run import preflight

if TYPE_CHECKING:  # annotations only
    from accelerate import Accelerator

MARKER = "COMPLETE"
MANIFEST = "manifest.json"


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


def manifest_of(folder: Path) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under a checkpoint folder."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, MARKER)):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out[str(path.relative_to(folder))] = {"size": path.stat().st_size, "sha256": digest.hexdigest()}
    return out


def damage(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (the first problem found), or None when it is intact.
    A checkpoint from before manifests (COMPLETE alone) counts as intact."""
    if not (folder / MANIFEST).is_file():
        return None if (folder / MARKER).exists() else "no COMPLETE marker"
    try:
        recorded = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"{MANIFEST} unreadable ({e})"
    for name, want in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, {want['size']} were written"
    actual = manifest_of(folder)
    for name, want in recorded.items():
        if actual[name]["sha256"] != want["sha256"]:
            return f"{name} does not match its checksum"
    foreign = sorted(set(actual) - set(recorded))
    if foreign:  # e.g. a planted custom_checkpoint_0.pkl, which accelerate would unpickle (code runs)
        return f"{foreign[0]} was not written with it"
    return None


def newest_intact(run_dir: Path, say: Callable[[str], None]) -> Path | None:
    """The newest checkpoint that proves itself, saying in one line which newer ones are damaged; None when
    there is no checkpoint; a UserError naming them when every one is damaged."""
    complete = list_complete(run_dir)
    damaged = []
    for folder in reversed(complete):
        why = damage(folder)
        if why is None:
            if damaged:
                say(f"checkpoint {damaged[-1][0]} is damaged ({damaged[-1][1]}); resuming from {folder} instead")
            return folder
        damaged.append((folder, why))
    if damaged:
        raise listing(
            f"--resume: no intact checkpoint in {checkpoint_root(run_dir)}; start a new run with another "
            "train.output_dir",
            [f"{folder.name}: {why}" for folder, why in damaged],
        )
    return None


def save(accelerator: Accelerator, run_dir: Path, step: int, keep: int, extra: dict, deepspeed: bool = False) -> Path:
    """Every rank writes its part into the temporary folder; after a barrier rank 0 writes the manifest
    and renames; a second barrier, so no rank moves on before the checkpoint exists."""
    root = checkpoint_root(run_dir)
    path, tmp = root / f"step_{step:07d}", root / f".step_{step:07d}.incomplete"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # a save killed part way, at this step, by an earlier attempt
    accelerator.wait_for_everyone()
    # DeepSpeed writes its own model file: leave the frozen base out of it too.
    kwargs = {"exclude_frozen_parameters": True} if deepspeed else {}
    try:
        accelerator.save_state(str(tmp), **kwargs)
    except Exception as e:
        if not preflight.is_io_error(e):
            raise
        previous = newest(run_dir)
        need = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file()) if previous else 0
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the previous checkpoints are untouched
        raise preflight.io_failure(run_dir, f"checkpoint {path.name}", e, previous, need) from None
    accelerator.wait_for_everyone()  # every rank's files are written
    if accelerator.is_main_process:
        (tmp / PROGRESS).write_text(json.dumps(extra, indent=1))
        (tmp / MANIFEST).write_text(json.dumps(manifest_of(tmp), indent=1))
        (tmp / MARKER).write_text("")
        _sync(tmp)
        if path.exists():  # a damaged checkpoint of the same step, from before a resume
            shutil.rmtree(path)
        os.replace(tmp, path)
        for old in list_complete(run_dir)[:-keep]:
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def _sync(folder: Path) -> None:
    """Flush the folder's files to the disk before the rename makes it count (a crash of the node then
    leaves either no step_N or a whole one)."""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


PROGRESS = "progress.json"


def load(accelerator: Accelerator, path: Path, deepspeed: bool = False) -> dict:
    """Load the adapter, optimizer and RNG states (accelerate reads them with torch's weights-only
    unpickler, which runs no code); returns progress.json: where the run stood and its schedule.
    Those two are JSON, not accelerate's custom checkpoints, which it unpickles with
    weights_only=False: a file planted in a shared run directory would run code on --resume."""
    meta = userio.read_json(path / PROGRESS, "--resume")
    if "progress" not in meta or "scheduler" not in meta:
        raise UserError(
            f"--resume: {path} was written by an older launcher (its progress is a pickle, not in "
            f"{PROGRESS}); resume it with that version, or start a new run"
        )
    # not strict: the checkpoint holds only the adapter, the base comes from the model files
    kwargs = {"load_module_strict": False} if deepspeed else {"strict": False}
    accelerator.load_state(str(path), **kwargs)
    return meta
