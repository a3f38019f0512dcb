"""Before anything heavy, and when the disk fails during a run: one line that says what and where.

`writable` runs before the model loads: the run directory and the cache can be created and written
(an output path naming a file, or below one, or a read-only mount, is a user error, not a traceback
after minutes of loading). `room` runs once the adapter's size is known: two checkpoints must fit.
`io_failure` turns a failed write during the run (a full disk, a quota, a vanished mount) into one
line: the path, what was being written, free against needed space, the newest intact checkpoint and
the command that resumes.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from pathlib import Path

from launcher.config.errors import UserError
from launcher.demo import builtin

MB = 2**20
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}
WRITE_FAILURES = (  # what writers that are not Python's own file objects say (seen on a full tmpfs)
    "No space left on device",
    "Disk quota exceeded",
    "Read-only file system",
    "basic_ios::clear",
    "unexpected pos",
    "PytorchStreamWriter failed",
)


def _creatable(path: Path, field: str) -> None:
    """`path` exists as a directory, or is made one; and a file can be written in it."""
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == path else f"is below {parent}, which is a file"
            raise UserError(f"{field}: {path} {where}, not a directory; choose another {field}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"{field}: cannot write in {path} ({e.strerror or e}); choose another {field}") from None


def writable(run_dir: Path, cache_dir: str | None = None) -> None:
    """The run directory and the cache (data.cache_dir, else LAUNCHER_CACHE) can be created and written."""
    _creatable(run_dir, "train.output_dir")
    if cache_dir:
        _creatable(Path(cache_dir), "data.cache_dir")
    else:
        _creatable(builtin.cache_dir(), "LAUNCHER_CACHE (the launcher's cache directory)")


def checkpoint_bytes(trainable: int, optimizer_state_bytes: int) -> int:
    """One checkpoint: the fp32 adapter, its optimizer state, and 1 MB for RNG, schedule and progress."""
    return trainable * (4 + optimizer_state_bytes) + MB


def room(run_dir: Path, need: int) -> None:
    """Refuse to start a run whose disk cannot hold two checkpoints (the newest and the one before it:
    rotation writes the new one before it deletes an old one)."""
    free = shutil.disk_usage(run_dir).free
    if free < 2 * need:
        raise UserError(
            f"train.output_dir: {run_dir} has {free / MB:.1f} MB free; two checkpoints need "
            f"{2 * need / MB:.1f} MB (the adapter and its optimizer state); free space or choose another "
            "train.output_dir"
        )


def io_failure(run_dir: Path, what: str, error: BaseException, newest: Path | None, need: int = 0) -> UserError:
    """One line for a write that failed during the run (`newest`: the newest intact checkpoint). Short
    enough for long paths: the run directory once, the checkpoint by name."""
    reason = getattr(error, "strerror", None) or next((s for s in WRITE_FAILURES if s in str(error)), str(error))
    try:
        free = f"{shutil.disk_usage(run_dir).free / MB:.1f} MB free"
    except OSError:
        free = "free space unknown"
    if need:
        free += f", about {need / MB:.1f} MB needed"
    saved = f"newest intact checkpoint: {newest.name}" if newest else "no checkpoint saved yet"
    return UserError(
        f"{reason} while writing {what} in {run_dir} ({free}); {saved}; after freeing space resume with: "
        f"launcher train {run_dir / 'recipe.yaml'} --resume"
    )


def is_io_error(error: BaseException) -> bool:
    """A failed write: an OSError of the disk (full, quota, read-only, I/O), or a writer's own error around
    one: torch.save's RuntimeError ("basic_ios::clear", "unexpected pos", "PytorchStreamWriter failed"),
    safetensors' SafetensorError ("I/O error: No space left on device (os error 28)")."""
    if isinstance(error, OSError):
        return error.errno in WRITE_ERRNOS
    return any(s in str(error) for s in WRITE_FAILURES)
