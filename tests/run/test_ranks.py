"""The stderr filter of a local multi-process launch: torchrun's failure report becomes one Failure,
everything else (progress bars, the ranks' own errors and tracebacks) passes through unchanged."""

import pytest

from launcher.run.ranks import _StderrFilter

BAR = b"train:  10%|#  | 1/10 [00:01<00:09]\rtrain:  20%|## | 2/10\r"
AGENT = (
    b"W1124 05:22:01.123000 1234 .venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/"
    b"api.py:900] Sending process 1235 closing signal SIGTERM\n"
)


def report(failures: list[tuple[int, int, int]]) -> bytes:
    """torchrun's ChildFailedError block: (rank, exitcode, pid) entries, the last one the root cause."""
    *others, root = failures

    def entry(i, rank, code, pid):
        return (
            f"[{i}]:\n  time      : 2026-11-24_05:22:01\n  host      : node7\n  rank      : {rank} (local_rank: "
            f"{rank})\n  exitcode  : {code} (pid: {pid})\n  error_file: <N/A>\n  traceback : x\n"
        ).encode()

    body = b"".join(entry(i + 1, *f) for i, f in enumerate(others)) or b"  <NO_OTHER_FAILURES>\n"
    return (
        b'Traceback (most recent call last):\n  File "<frozen runpy>", line 198, in _run_module_as_main\n'
        b"torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        + b"=" * 60
        + b"\nlauncher.train FAILED\n"
        + b"-" * 60
        + b"\nFailures:\n"
        + body
        + b"-" * 60
        + b"\nRoot Cause (first observed failure):\n"
        + entry(0, *root)
        + b"=" * 60
        + b"\n"
    )


def run_filter(data: bytes, step: int) -> tuple[bytes, object]:
    out = []
    f = _StderrFilter(out.append)
    for i in range(0, len(data), step):
        f.feed(data[i : i + step])
    f.flush()
    return b"".join(out), f.failure


@pytest.mark.parametrize("step", [1, 7, 65536])
def test_the_report_is_read_and_held_back(step):
    text, failure = run_filter(BAR + AGENT + report([(1, -9, 1236)]) + b"after\n", step)
    assert text == BAR + b"after\n"
    assert (failure.rank, failure.host, failure.exitcode, failure.pid) == ("1", "node7", -9, "1236")
    assert failure.how() == "was killed by SIGKILL"


def test_the_killed_rank_wins_over_a_peer_torchrun_saw_first():
    """Rank 0 exits 1 on its broken collective before torchrun notices rank 1's SIGKILL."""
    _, failure = run_filter(report([(1, -9, 1236), (0, 1, 1235)]), 65536)
    assert (failure.rank, failure.exitcode) == ("1", -9)
    _, failure = run_filter(report([(0, -15, 1235), (1, -9, 1236)]), 65536)  # SIGTERM is torchrun's own
    assert (failure.rank, failure.exitcode) == ("1", -9)
    _, failure = run_filter(report([(0, -15, 1235), (1, 2, 1236)]), 65536)
    assert (failure.rank, failure.how()) == ("1", "exited with status 2")


def test_other_output_passes_unchanged():
    data = b"Traceback (most recent call last):\n  File x\nValueError: boom\nerror: data.path: x\nW1 is not a log\n"
    text, failure = run_filter(data, 3)
    assert text == data and failure is None
