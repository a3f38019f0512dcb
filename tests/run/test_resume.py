"""Exact resume from a checkpoint, 2-process DDP on CPU, and stopping: USR2 (checkpoint, exit 3) and a dead rank."""

import json
import shutil

import pytest
import torch
from conftest import launched_rank, run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

COMMON = [
    "train.max_steps=40",
    "train.save_every=20",
    "train.keep_checkpoints=5",
    "train.eval_every=20",
    "train.grad_accum=2",
    "train.micro_batch_size=16",
    "peft.dropout=0.1",
    "data.max_samples=600",
]


def test_resume_matches_uninterrupted_run(tmp_path):
    """Run A goes 0->40. Run B holds only A's step-20 checkpoint (as if killed after it) and resumes.

    grad_accum=2 and dropout>0 make the check strict: batches skipped, RNG and optimizer restored.
    """
    a, b = tmp_path / "a", tmp_path / "b"
    res = run_cli("train", f"train.output_dir={a}", *COMMON)
    assert res.returncode == 0, res.stderr[-3000:]
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints/step_0000020", b / "checkpoints/step_0000020")
    res = run_cli("train", f"train.output_dir={b}", *COMMON, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout + res.stderr
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5)
    summary = json.loads((b / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["steps"] == 40
    steps = [
        json.loads(line)["step"]
        for line in (b / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps == [30, 40]  # continues the numbering, no repeated steps


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    res = run_cli(
        "train",
        f"train.output_dir={tmp_path / 'r'}",
        "train.max_steps=3",
        "train.warmup_steps=0",
        "data.max_samples=200",
        "--resume",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "r/summary.json").read_text())["restarts"] == 0


def test_two_process_ddp_on_cpu(tmp_path):
    run = tmp_path / "ddp"
    res = run_cli(
        "train",
        "dist.nproc=2",
        f"train.output_dir={run}",
        "train.max_steps=6",
        "train.warmup_steps=0",
        "train.eval_every=6",
        "data.max_samples=400",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["strategy"] == "ddp" and summary["steps"] == 6
    assert load_file(run / "adapter_model.safetensors")


def test_usr2_checkpoints_and_exits_3_then_resume_finishes(tmp_path):
    """Outside Slurm too: USR2 (or TERM) stops a run at the next step with a checkpoint; exit 3."""
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "r"
    args = [
        sys.executable,
        "-m",
        "launcher",
        "train",
        f"train.output_dir={run}",
        "train.max_steps=400",
        "train.log_every=1",
        "train.save_every=1000",
        "train.eval_every=1000",
        "train.warmup_steps=0",
        "data.max_samples=300",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").exists() and '"loss"' in (run / "metrics.jsonl").read_text()):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    stopped = json.loads((run / "interrupted.json").read_text())
    assert stopped["signal"] == "SIGUSR2" and 1 <= stopped["step"] < 400
    assert "--resume" in err and "Traceback" not in err
    assert (run / "checkpoints" / f"step_{stopped['step']:07d}" / "COMPLETE").exists()
    res = run_cli(
        "train",
        f"train.output_dir={run}",
        f"train.max_steps={stopped['step'] + 2}",
        "train.log_every=1",
        "train.save_every=1000",
        "train.eval_every=1000",
        "train.warmup_steps=0",
        "data.max_samples=300",
        "--resume",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (run / "interrupted.json").exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, stopped["step"] + 3))


def test_a_killed_rank_is_one_line_naming_it_the_checkpoint_and_the_resume_command(tmp_path):
    """SIGKILL of one DDP rank: the run ends at once, non-zero, and instead of torchrun's failure block
    the user reads which rank died and how, the newest complete checkpoint, and the exact command."""
    import shlex
    import signal
    import subprocess
    import sys
    import time

    from launcher.run import checkpoint

    run = tmp_path / "run"
    args = [
        "dist.nproc=2",
        f"train.output_dir={run}",
        "train.max_steps=5000",
        "train.save_every=4",
        "train.warmup_steps=0",
        "train.eval_every=5000",
        "data.max_samples=400",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 300
        while checkpoint.newest(run) is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert checkpoint.newest(run) is not None, proc.communicate(timeout=60)[1][-3000:]
        victim = launched_rank(proc.pid, 1)
        victim.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode not in (0, None), err[-3000:]
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    line = errors[0]
    assert f"rank 1 (pid {victim.pid} on " in line and "was killed by SIGKILL" in line, line
    assert f"newest complete checkpoint: {checkpoint.newest(run)}" in line, line
    assert line.endswith("continue with: " + shlex.join(["launcher", "train", *args, "--resume"])), line
