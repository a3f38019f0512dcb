"""Running a local multi-process launch, and saying in one line what became of a rank that failed.

When a rank dies, torchrun (under `accelerate launch`) ends every other rank and prints a Python
traceback ending in `ChildFailedError` plus a framed report, and its agent logs a few lines of its
own. The launcher passes everything else the ranks write to stderr through as it comes (progress
bars included) and holds back only those, from which it takes the rank, host, pid and exit status.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass

_TRACEBACK = b"Traceback (most recent call last):"
# torchrun's agent logs (elastic/) and its start-up banner (run.py: "Setting OMP_NUM_THREADS ...").
_AGENT_LOG = re.compile(rb"[IWE]\d{4} [\d:.]+ +\d+ \S*torch/distributed/(elastic/|run\.py)")
_FIELD = re.compile(rb"^\s+(rank|host|exitcode|traceback)\s*: (.*?)\s*$")


@dataclass
class Failure:
    rank: str = "?"
    host: str = "?"
    exitcode: int = 1
    pid: str = "?"

    def how(self) -> str:
        if self.exitcode < 0:
            try:
                return f"was killed by {signal.Signals(-self.exitcode).name}"
            except ValueError:
                return f"was killed by signal {-self.exitcode}"
        return f"exited with status {self.exitcode}"


class _StderrFilter:
    """Bytes in, bytes out: lines pass at once, except torchrun's failure report and agent logs."""

    def __init__(self, write):
        self.write, self.line, self.held, self.mode = write, b"", [], "pass"
        self.failures: list[Failure] = []  # every rank the report lists, root cause last
        self._bars = 0  # '=====' lines seen in the report

    def feed(self, data: bytes) -> None:
        for piece in re.split(rb"(?<=[\r\n])", data):
            if piece:
                self._piece(piece)

    def _piece(self, piece: bytes) -> None:
        self.line += piece
        done = self.line.endswith((b"\n", b"\r"))
        if self.mode == "pass" and not self.held and not done and self._may_hold(self.line):
            return  # too early to tell; wait for more of the line
        if self.mode == "pass" and not self.held and not self._starts_hold(self.line):
            self.write(self.line)  # an ordinary line (or a progress bar's redraw): at once
            self.line = b""
            return
        if done:
            line, self.line = self.line, b""
            self._line(line)

    @staticmethod
    def _may_hold(start: bytes) -> bool:
        """Could this unfinished line still become held? (A traceback header, or an agent log line:
        `W1124 05:22:01...`, which is always finished with a newline, so it is safe to wait for.)"""
        return (
            _TRACEBACK.startswith(start[: len(_TRACEBACK)])
            or re.match(rb"[IWE]\d{0,4}$|[IWE]\d{4} ", start) is not None
        )

    @staticmethod
    def _starts_hold(line: bytes) -> bool:
        return line.startswith(_TRACEBACK) or _AGENT_LOG.match(line) is not None

    def _line(self, line: bytes) -> None:
        if self.mode == "report":  # ChildFailedError's frame: read every failed rank, print none of it
            if re.match(rb"\s*\[\d+\]:", line):
                self.failures.append(Failure())
            m = _FIELD.match(line)
            if m and self.failures:
                self._field(self.failures[-1], m.group(1).decode(), m.group(2).decode(errors="replace"))
            self._bars += line.startswith(b"=====")
            if self._bars >= 2:
                self.mode = "pass"
            return
        if _AGENT_LOG.match(line):
            return  # the agent's own account of the failure; the one-line summary replaces it
        self.held.append(line)
        if line.startswith((b" ", b"\t", b"Traceback", b"During handling", b"The above exception")) or not line.strip():
            return  # still inside the traceback
        if b"ChildFailedError" in line:  # the launcher's own exception: swallow it and read its report
            self.held, self.mode, self.failures, self._bars = [], "report", [], 0
        else:
            self.flush()

    @property
    def failure(self) -> Failure | None:
        """The rank that failed first in fact: one killed by a signal (the others then fail on their
        collectives, and torchrun may observe one of those first; seen once ranks exit promptly),
        else torchrun's root cause."""
        if not self.failures:
            return None
        root = self.failures[-1]  # the report's "Root Cause" comes last
        # SIGTERM is torchrun stopping the others; any other signal came from outside (OOM killer, kill -9).
        killed = [f for f in self.failures if f.exitcode < 0 and f.exitcode != -signal.SIGTERM]
        return root if root in killed or not killed else killed[0]

    @staticmethod
    def _field(failure: Failure, key: str, value: str) -> None:
        if key == "rank":
            failure.rank = value.split()[0]
        elif key == "host":
            failure.host = value
        elif key == "exitcode":  # "-9 (pid: 1234)"
            code = re.match(r"-?\d+", value)
            pid = re.search(r"pid:? (\d+)", value)
            failure.exitcode = int(code.group()) if code else 1
            failure.pid = pid.group(1) if pid else "?"

    def flush(self) -> None:
        for line in self.held:
            self.write(line)
        self.held = []
        if self.line:
            self.write(self.line)
            self.line = b""


def run(cmd: list[str]) -> tuple[int, Failure | None]:
    """Run the launch with stderr filtered; (exit status, the failed rank as torchrun reported it)."""
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None

    def write(data: bytes) -> None:
        if out is not None:
            out.write(data)
            out.flush()
        else:
            sys.stderr.write(data.decode(errors="replace"))

    filt = _StderrFilter(write)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        while chunk := os.read(proc.stderr.fileno(), 65536):
            filt.feed(chunk)
    finally:
        filt.flush()
        proc.stderr.close()
        code = proc.wait()
    return code, filt.failure if code else None
