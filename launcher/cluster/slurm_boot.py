"""How a Slurm task starts: submitit's job runner, with no window in which USR2 kills it.

Slurm's `--signal=USR2@T` goes to every process of the job step. submitit installs its handler
only after Python has started, imported submitit and unpickled the job (which imports torch):
seconds on a busy node. A USR2 in that window used to kill the task outright (the default
action), so a job signalled during start-up ended FAILED without a word. The task's command is
therefore `bash -c 'trap "" USR2; exec python -m launcher.cluster.slurm_boot ...'`: the signal is ignored
from before Python starts (an ignored signal stays ignored across exec), and this module, the
first Python code to run, records any USR2 from then on. `NodeJob` turns a recorded signal into a
stop request for the training it launches. Standard library only, so it starts in milliseconds.
"""

from __future__ import annotations

import runpy
import shlex
import signal
import sys

EARLY: list[int] = []  # USR2 signals that arrived before the job's own handler was installed


def command(python: str = sys.executable) -> str:
    """The shell command submitit runs for a task (it appends `-u -m submitit.core._submit FOLDER`)."""
    script = 'trap "" USR2; exec "$0" -u -m launcher.cluster.slurm_boot "$@"'
    return f"bash -c {shlex.quote(script)} {shlex.quote(python)}"


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGUSR2, lambda signum, frame: EARLY.append(signum))
    args = argv[1:]
    while args and args[0] == "-u":  # submitit passes the interpreter's flags; -u is already applied
        args = args[1:]
    if len(args) < 2 or args[0] != "-m":
        raise SystemExit(f"launcher.cluster.slurm_boot: expected [-u] -m MODULE ARGS, got {args!r}")
    sys.argv = [args[1], *args[2:]]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":  # run as a script: record into the importable module, which NodeJob reads
    from launcher.cluster import slurm_boot

    slurm_boot.main(sys.argv)
