"""Hung ranks end the run, and say who: a collective timeout the recipe sets, and each rank's heartbeat.

torch's default process-group timeout is 30 minutes, and a frozen rank (SIGSTOP, a wedged GPU, a stuck
network filesystem) leaves the others waiting in a collective with no word. Here start-up and the
first step get `max(dist.timeout_s, 1800)` s (loading and tokenizing take long), after which the
timeout drops to `dist.timeout_s`, as torchtitan does. A thread in every rank writes a heartbeat (its
step, pid, host and time) every BEAT_EVERY_S seconds, also while the rank waits in a collective, so a
process that stopped running (frozen) is the one whose heartbeat is old. The rank whose collective
times out reads them, names the frozen ranks, asks each local one for its Python stack (SIGQUIT, which
`faulthandler` answers where the process can still run) and kills it, so the launch ends now rather
than after the launcher's own grace period.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

START_TIMEOUT_S = 1800  # loading a 70B checkpoint on rank 0 while the others wait at a barrier
BEAT_EVERY_S = 2.0  # a heartbeat file write per rank this often (a shared filesystem takes that easily)
STALE_AFTER_S = 5 * BEAT_EVERY_S  # a heartbeat this old: the process is not running
REPORTED = "reported"  # written by the rank that reported a hung collective
HUNG_EXIT = 4  # a rank's exit status when it reported a hung collective itself (the launcher adds nothing)
# A collective that waited too long (gloo; NCCL's watchdog; torch's own); not a connect that failed.
TIMED_OUT = ("Timed out waiting", "Watchdog caught collective operation timeout", "DistTimeoutError")


def start_timeout(timeout_s: int) -> timedelta:
    return timedelta(seconds=max(timeout_s, START_TIMEOUT_S))


def init_restarted_group(timeout_s: int, backend: str) -> None:
    """A rank torchrun restarted (dist.max_restarts) joins a process group of its own attempt. The
    agent's store outlives the attempt and still holds the dead ranks' addresses under the default
    group's keys: a restarted gloo rank read one and failed to connect ("Connection refused", the dead
    rank's port) in about one restart of three. Prefixing every key with the attempt leaves the new ones."""
    import torch.distributed as dist

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if attempt == 0 or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return
    store, rank, world = next(dist.rendezvous("env://"))
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"launcher-attempt-{attempt}/", store),
        rank=rank,
        world_size=world,
        timeout=start_timeout(timeout_s),
    )


class Watch:
    """This rank's heartbeat thread, and the shortened timeout after the first step."""

    def __init__(self, run_dir: Path, rank: int, world: int, timeout_s: int):
        self.dir, self.rank, self.world, self.timeout_s = run_dir / "heartbeat", rank, world, timeout_s
        self.step = 0
        self.shortened = False
        if world > 1:
            self.dir.mkdir(parents=True, exist_ok=True)
            faulthandler.register(signal.SIGQUIT, file=sys.stderr, all_threads=True)
            self._write()
            threading.Thread(target=self._run, name="launcher-heartbeat", daemon=True).start()

    def beat(self, step: int) -> None:
        """An optimizer step is done (after the first: every later collective gets the short timeout)."""
        self.step = step
        if self.world > 1 and not self.shortened:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.distributed_c10d._set_pg_timeout(timedelta(seconds=self.timeout_s))
            self.shortened = True

    def _run(self) -> None:
        while True:
            time.sleep(BEAT_EVERY_S)
            try:
                self._write()
            except OSError:
                pass  # a full or vanished disk is reported by the run's own writes

    def _write(self) -> None:
        row = {"rank": self.rank, "step": self.step, "pid": os.getpid(), "host": socket.gethostname()}
        tmp = self.dir / f".rank{self.rank}.tmp"
        tmp.write_text(json.dumps({**row, "time": time.time()}))
        os.replace(tmp, self.dir / f"rank{self.rank}.json")


def reported(run_dir: Path, since: float) -> bool:
    """Whether a rank of the launch that started at `since` reported a hung collective itself."""
    marker = run_dir / "heartbeat" / REPORTED
    return marker.exists() and marker.stat().st_mtime >= since


def timed_out(error: BaseException) -> bool:
    return any(s in str(error) or s in type(error).__name__ for s in TIMED_OUT)


def stale_ranks(run_dir: Path, me: int, older_than_s: float) -> list[dict]:
    """Heartbeats of this run's other ranks (written since this process started) that have not been
    renewed for `older_than_s` seconds: processes that stopped running."""
    import psutil

    now, born, out = time.time(), psutil.Process().create_time(), []
    for path in sorted((run_dir / "heartbeat").glob("rank*.json")):
        try:
            row = json.loads(path.read_text())
            rank, pid, beat = int(row["rank"]), int(row["pid"]), float(row["time"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if rank != me and beat > born - 60 and now - beat > older_than_s:
            out.append({**row, "rank": rank, "pid": pid, "age_s": now - beat})
    return out


def end_stale(stale: list[dict]) -> None:
    """Ask each stale rank on this host for its Python stack (SIGQUIT: faulthandler answers where the
    process still runs), and have it killed 2 s after this rank has exited, so the launch ends now and
    torchrun still reports this rank's own failure first (a SIGSTOPped rank would hold its teardown for
    its 30 s grace period). Only a process that is a launcher rank is touched."""
    import psutil

    here = socket.gethostname()
    for row in stale:
        try:
            proc = psutil.Process(row["pid"])
            if row["host"] != here or "launcher.train" not in " ".join(proc.cmdline()):
                continue
            proc.send_signal(signal.SIGQUIT)
        except (psutil.Error, OSError):
            continue
        subprocess.Popen(["sh", "-c", f"sleep 2; kill -9 {int(row['pid'])}"], start_new_session=True)


def report(run_dir: Path, me: int, timeout_s: int, newest: Path | None) -> str:
    """The one line for a timed-out collective: who stopped answering, the checkpoint, the resume command."""
    (run_dir / "heartbeat" / REPORTED).write_text(str(me))  # the launcher then adds no line of its own
    stale = stale_ranks(run_dir, me, older_than_s=STALE_AFTER_S)
    end_stale(stale)
    who = (
        "; ".join(
            f"rank {r['rank']} (pid {r['pid']} on {r['host']}) last reported step {r['step']} {r['age_s']:.0f} s ago"
            for r in stale
        )
        or "no rank's heartbeat is stale (the wait is in the network or a collective itself)"
    )
    saved = f"newest intact checkpoint: {newest.name}" if newest else "no checkpoint saved yet"
    return (
        f"rank {me}: a collective waited more than dist.timeout_s={timeout_s} s; stopped answering: {who}; "
        f"{saved}; resume with: launcher train {run_dir / 'recipe.yaml'} --resume"
    )
