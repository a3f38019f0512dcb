"""The benchmark scripts run end to end (their figures go in docs/benchmarks.md, not in assertions on speed)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def _vs_hf(*args: str) -> dict:
    """bench/vs_hf.py on 96 long samples of up to 128 tokens, one repeat: its final JSON."""
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench/vs_hf.py"),
            "--samples",
            "96",
            "--seq-len",
            "128",
            "--repeats",
            "1",
            "--run-timeout",
            "400",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout[res.stdout.index("{\n") :])
    for side in out["median"].values():
        assert side["tokens_per_s"] > 0 and side["eval_loss"] == side["eval_loss"] and side["steps"] >= 4
        assert 0 < side["heldout_loss"] < 20  # the common evaluation of each saved adapter
    launcher, hf = out["median"]["launcher"], out["median"]["hf"]
    assert launcher["heldout_tokens"] == hf["heldout_tokens"] > 0  # over the same held-out tokens
    return out


def test_vs_hf_long_data_runs_both_paths_on_the_same_samples():
    """Two processes a side: the launcher's DDP and the Trainer under torchrun, each with its live
    tensor peak (TRL's SFTTrainer as the baseline runs in the acceptance dry run below)."""
    out = _vs_hf("--data", "long", "--nproc", "2", "--live-memory")
    launcher, hf = out["median"]["launcher"], out["median"]["hf"]
    assert out["packing"] and out["seq_len"] == 128 and out["nproc"] == 2
    # one epoch each: the launcher packs ~2 rows of 128 tokens per rank and step, HF pads 8 samples per rank
    assert 0.5 * hf["steps"] <= launcher["steps"] <= 2 * hf["steps"], (launcher, hf)
    assert set(out["launcher_over_hf"]) >= {"tokens_per_s", "wall_s", "first_step_s", "peak_gb", "eval_loss"}
    for side in (launcher, hf):  # live tensors: the model's weights and more, well under the process's RSS
        assert 0.001 < side["live_peak_gb"] < side["peak_gb"], side


LIVE_PROBE = """
import torch
layer = torch.nn.Linear(1024, 1024)  # 4 MiB of weights, made before training starts: counted
x = torch.randn(2048, 1024)  # 8 MiB
with torch.no_grad():
    layer(x)  # not training: the count has not started
layer.train()
out = layer(x)  # 8 MiB kept for backward
(out * out).sum().backward()
"""


def test_live_peak_counts_the_tensors_a_step_holds(tmp_path):
    """bench/live_peak: what `--live-memory` reads, on a step whose tensors are known."""
    sys.path.insert(0, str(ROOT))
    from bench.vs_hf import live_peak

    with live_peak(tmp_path / "live") as live:
        res = subprocess.run([sys.executable, "-c", LIVE_PROBE], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    # at its peak: weights 4 + input 8 + output 8 + out*out 8 (+ its gradient 8, the weight's 4) MiB
    assert 28 / 1024 <= live["live_peak_gb"] <= 48 / 1024, live


PROFILE_PROBE = """
import torch
from torch.utils.checkpoint import checkpoint
layer = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024))
opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
x = torch.randn(1024, 1024)
for _ in range(7):  # 2 skipped, 1 warm-up, 3 recorded, then the report
    checkpoint(layer, x, use_reentrant=False).square().mean().backward()
    opt.step()
    opt.zero_grad()
"""


def test_step_profile_splits_a_step_by_kind_and_phase(tmp_path):
    """bench/step_profile: what `--profile` reads, on a checkpointed step of two matmuls a pass."""
    sys.path.insert(0, str(ROOT))
    from bench.vs_hf import instrumented

    with instrumented(tmp_path / "prof", "step_profile", "STEP_PROFILE_DIR") as prof:
        res = subprocess.run([sys.executable, "-c", PROFILE_PROBE], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    [p] = prof
    kinds, phases = p["kinds_s"], p["phases_s"]
    assert max((k for k in kinds if k != "between ops"), key=kinds.get) == "matmul", p
    assert abs(sum(kinds.values()) - p["step_s"]) <= 0.01 * p["step_s"] + 0.002, p  # every second placed once
    assert abs(sum(phases.values()) - p["ops_s_per_step"]) <= 0.002, p
    # forward, its recompute (the same two matmuls) and backward (four: input and weight gradients)
    assert phases["recompute"] > 0.3 * phases["forward"] and phases["backward"] > phases["recompute"], p
    assert phases["optimizer"] > 0, p


HUNG_TREE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a rank that never ends
print(child.pid, flush=True)
print("rank 0: waiting", file=sys.stderr, flush=True)
time.sleep(600)
"""


def test_a_hung_run_is_one_line_naming_it_and_its_whole_tree_is_killed(tmp_path, monkeypatch):
    """bench/vs_hf.run: a side that never exits ends the benchmark in one line, its ranks killed with it."""
    import psutil

    sys.path.insert(0, str(ROOT))
    from bench import vs_hf

    monkeypatch.setattr(vs_hf, "RUN_TIMEOUT_S", 3)
    with pytest.raises(SystemExit) as e:
        vs_hf.run([sys.executable, "-c", HUNG_TREE], "the launcher's run")
    assert str(e.value).startswith("the launcher's run did not exit within 3 s (hung)") and "rank 0: waiting" in str(
        e.value
    )
    ranks = [p for p in psutil.process_iter(["cmdline"]) if "time.sleep(600)" in " ".join(p.info["cmdline"] or [])]
    assert not [p for p in ranks if p.status() != psutil.STATUS_ZOMBIE], ranks


def _data_scale(*args: str) -> str:
    cmd = [sys.executable, str(ROOT / "bench/data_scale.py"), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip().splitlines()[-1]


def test_data_scale_measures_both_sides_on_the_same_file(tmp_path):
    """bench/data_scale.py at 400 samples: the file, tokenizer and model are made; both sides tokenize
    the same samples; two ranks report the memory the data adds."""
    d = str(tmp_path / "ds")
    assert _data_scale("make", "--samples", "400", "--out", d).endswith("alpaca-400.jsonl")
    ours = json.loads(_data_scale("ours", "--dir", d, "--samples", "400"))
    hf = json.loads(_data_scale("hf", "--dir", d, "--samples", "400"))
    assert ours["samples"] == hf["samples"] == 400
    assert ours["tokens"] == hf["tokens"] + 400  # the same text; the launcher adds a BOS to each sample
    rss = json.loads(_data_scale("rss", "--dir", d, "--samples", "400", "--packing"))
    assert len(rss["ranks"]) == 2 and all({"private", "anon", "pss"} <= set(r) for r in rss["ranks"])


def test_gpu_acceptance_dry_mode_runs_every_step_but_the_gpu_calls(tmp_path):
    """bench/gpu_acceptance.sh --dry: the GPU tests collected, the launcher beside TRL on the tiny model on
    this CPU, the plan for that run next to what it measured, all in one JSON."""
    out = tmp_path / "acc"
    res = subprocess.run(
        ["bash", str(ROOT / "bench/gpu_acceptance.sh"), "--dry", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "acceptance.json").read_text())
    steps = report["steps"]
    assert report["dry"] and set(steps) == {"gpu_tests", "vs_trl", "plan"}
    assert steps["gpu_tests"]["rc"] == 0 and steps["gpu_tests"]["collected"] >= 4
    launcher, trl = steps["vs_trl"]["launcher"], steps["vs_trl"]["trl"]
    assert launcher["tokens_per_s"] > 0 and trl["tokens_per_s"] > 0
    # TRL's SFTTrainer (bfd packing, padding-free) and the launcher both pack ~2 rows of 128 tokens a step
    assert 0.7 * trl["steps"] <= launcher["steps"] <= 1.4 * trl["steps"], (launcher, trl)
    assert launcher["heldout_tokens"] == trl["heldout_tokens"] > 0  # one held-out evaluation of both adapters
    plan = steps["plan"]
    assert plan["measured"]["allocated_gb"] == steps["vs_trl"]["launcher"]["peak_gb"]
    assert 0.5 < plan["planned_over_measured"]["allocated_gb"] < 2  # the CPU plan of the same run, resident size
