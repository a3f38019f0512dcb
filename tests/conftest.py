import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def launcher_cache(tmp_path_factory):
    """Built-in model goes to a per-session cache; subprocesses inherit it."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["LAUNCHER_CACHE"] = str(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # What `launcher train` sets for itself (launcher/run/hostmem.py), set for the whole session: a
    # test that calls the CLI in this process would otherwise change what the processes of later
    # tests inherit.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return path


@pytest.fixture(autouse=True)
def _in_a_temporary_directory(tmp_path, monkeypatch):
    """Every test (and every process it starts) runs in its own temporary directory: nothing reads
    or writes the working directory a user ran pytest from (a quick start's runs/demo there once
    made a test fail)."""
    monkeypatch.chdir(tmp_path)


def run_cli(*args, cwd=None, timeout=600, module="launcher"):
    """Run `python -m launcher ARGS` in a fresh process; returns CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


requires_gpu = pytest.mark.skipif(not gpu_available(), reason="GPU test: no CUDA device on this machine")


def launched_rank(launcher_pid: int, local_rank: int):
    """The psutil process of one rank (`launcher.train` with that LOCAL_RANK) under a launch."""
    import psutil

    return next(
        p
        for p in psutil.Process(launcher_pid).children(recursive=True)
        if "launcher.train" in " ".join(p.cmdline()) and p.environ().get("LOCAL_RANK") == str(local_rank)
    )


def pytest_collection_modifyitems(config, items):
    """Files with the most `slow` tests first (a stable sort, the same in every xdist worker): pyproject
    runs the suite as `-n 2 --dist loadfile`, and a long file collected last (test_bench.py) left one
    worker running it alone for the last 5 of 21.5 minutes."""
    slow: dict[Path, int] = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + bool(item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])
