"""Jobs on a real Slurm cluster started by the tests (controller + two `slurmd -N` nodes).

Skipped with the reason when Slurm cannot start here; with LAUNCHER_REQUIRE_SLURM=1 (set by
.ci/run) that is a failure instead, so CI never passes with these skipped.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli
from safetensors.torch import load_file

sys.path.insert(0, str(ROOT / "tests" / "helpers"))
import slurm_cluster  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

TRAIN = [
    "train.warmup_steps=0",
    "data.max_samples=240",
    "train.micro_batch_size=8",
    "--gpus-per-node",
    "0",
    "--time",
    "15",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = slurm_cluster.missing()
    if why:
        if os.environ.get("LAUNCHER_REQUIRE_SLURM") == "1":
            pytest.fail(f"LAUNCHER_REQUIRE_SLURM=1 but {why}")
        pytest.skip(f"no Slurm cluster: {why}")
    d = tmp_path_factory.mktemp("slurm")
    conf = slurm_cluster.up(d)
    # sbatch/squeue/scontrol here and in the jobs read SLURM_CONF; both "nodes" share this
    # machine's cores, so one thread per process (jobs inherit the environment).
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "OMP_NUM_THREADS")}
    os.environ.update(SLURM_CONF=str(conf), OMP_NUM_THREADS="1")
    yield d
    subprocess.run(["scancel", "--user", "root"], capture_output=True)
    slurm_cluster.down(d)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _job_ids(run: Path) -> list[str]:
    return [json.loads(line)["job"] for line in (run / "slurm" / "jobs.jsonl").read_text().splitlines()]


def _logs(run: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run / "slurm").glob("*_log.*")))


def _train_steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_two_node_ddp_job(cluster, tmp_path):
    run = tmp_path / "run"
    res = run_cli(
        "submit",
        f"train.output_dir={run}",
        "train.max_steps=4",
        "train.eval_every=4",
        *TRAIN,
        "--nodes",
        "2",
        "--wait",
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:] + _logs(run)[-4000:]
    assert "submitted job" in res.stdout and "COMPLETED" in res.stdout
    logs = _logs(run)
    assert "machine rank 0 restart 0" in logs and "machine rank 1 restart 0" in logs  # each node its own rank
    port = 20000 + int(_job_ids(run)[0]) % 20000
    assert f"--main_process_ip n1 --main_process_port {port}" in logs
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["strategy"] == "ddp" and summary["steps"] == 4
    adapter = load_file(run / "adapter_model.safetensors")
    assert adapter and all(k.startswith("base_model.") and "lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained, not the zero init
    from peft import PeftModel

    from launcher.demo.builtin import ensure_tiny_llama

    base = __import__("transformers").AutoModelForCausalLM.from_pretrained(ensure_tiny_llama())
    model = PeftModel.from_pretrained(base, run)  # plain peft loads the adapter
    name = next(k for k in adapter if "lora_B" in k).replace(".weight", ".default.weight")
    torch.testing.assert_close(model.state_dict()[name], adapter[next(k for k in adapter if "lora_B" in k)])
    result = json.loads((run / "result.json").read_text())
    assert result["world"] == 2 and result["nodes"] == 2 and result["tokens_per_s"] > 0


def test_array_sweep_and_report(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    res = run_cli(
        "sweep",
        "train.max_steps=3",
        "train.eval_every=3",
        *TRAIN,
        "--launch",
        "task",
        "--grid",
        "micro_batch=4,8",
        "--out",
        sweep,
        "--wait",
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "2 runs in 1 array(s)" in res.stdout
    results = sorted(json.loads(p.read_text())["micro_batch_size"] for p in sweep.glob("p*/result.json"))
    assert results == [4, 8]
    res = run_cli("report", sweep)
    assert res.returncode == 0, res.stderr[-2000:]
    table = [line for line in res.stdout.splitlines() if line.startswith("| p0")]
    assert len(table) == 2
    for name in ("report.md", "report.csv", "throughput.png", "memory.png"):
        assert (sweep / name).stat().st_size > 0, name
    assert len((sweep / "report.csv").read_text().splitlines()) == 3


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def _interrupted_run_finishes(tmp_path, interrupt, total: int = 60) -> tuple[Path, str]:
    """Submit a 2-node run, call interrupt(job_id) after 3 steps, let the requeued job finish, and
    check that nothing repeats: steps 1..N once each, every rank's micro batches once, no sample
    twice within an epoch, logs appended across the attempts."""
    from launcher.cluster import slurm

    run = tmp_path / "run"
    res = run_cli(
        "submit",
        f"train.output_dir={run}",
        f"train.max_steps={total}",
        "train.log_every=1",
        "train.save_every=1000",
        "train.eval_every=1000",
        "data.log_sample_ids=true",
        *TRAIN,
        "--nodes",
        "2",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    job = _job_ids(run)[0]
    _wait_for(lambda: (run / "metrics.jsonl").exists() and len(_train_steps(run)) >= 3, 300, "3 training steps")
    interrupt(job)
    _wait_for(lambda: slurm.job_state(job).get("Restarts", "0") != "0", 300, "the requeue")
    # Slurm holds a requeued job two minutes before it is eligible again; release it now.
    _wait_for(lambda: slurm.job_state(job).get("JobState") != "COMPLETING", 120, "the requeued job to leave COMPLETING")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
    states = slurm.wait([job], say=lambda *_: None)
    assert states[job] == "COMPLETED", _logs(run)[-4000:]

    logs = _logs(run)
    assert "training stopped at step" in logs
    stopped = int(logs.split("training stopped at step ")[1].split()[0])
    assert 3 <= stopped < total
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:07d}'} at step {stopped} (restart 1)" in logs
    assert "machine rank 0 restart 0" in logs and "machine rank 0 restart 1" in logs  # logs appended, not truncated
    restarts = [json.loads(line)["restart"] for line in (run / "slurm/restarts.jsonl").read_text().splitlines()]
    assert restarts == [0, 1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == total and summary["restarts"] == 1
    assert _train_steps(run) == list(range(1, total + 1))  # continuous numbering, no step twice
    assert not (run / "interrupted.json").exists()
    for rank in (0, 1):  # every micro batch once: no step repeated, no sample twice within an epoch
        rows = [json.loads(line) for line in (run / f"sample_ids/rank{rank}.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows if "ids" in r]
        assert steps == list(range(total)), steps
        seen: dict[int, list] = {}
        for r in rows:
            if "ids" in r:
                seen.setdefault(r["epoch"], []).extend(i for i in r["ids"] if i >= 0)
        for ids in seen.values():
            assert len(ids) == len(set(ids))
    return run, logs


def test_max_array_size_is_read_from_the_cluster(cluster):
    """The test cluster sets MaxArraySize=2 (Slurm's default is 1001): a sweep splits its arrays by it."""
    from launcher.cluster import sweep

    assert sweep.max_array_size() == 2
    assert [len(m) for _, m in sweep.arrays({"a": list(range(5)), "b": [9]}, sweep.max_array_size())] == [2, 2, 1, 1]


def test_time_limit_signal_requeues_and_resumes(cluster, tmp_path):
    """USR2 as Slurm sends it before the time limit (`--signal=USR2@T` delivers it to every
    process of the job): checkpoint, requeue through submitit, resume, finish."""
    _, logs = _interrupted_run_finishes(
        tmp_path, lambda job: subprocess.run(["scancel", "--signal=USR2", job], check=True)
    )
    assert "(SIGUSR2)" in logs and "Requeued job" in logs


def test_preemption_requeues_and_resumes(cluster, tmp_path):
    """A job in partition `urgent` preempts ours (PreemptMode=REQUEUE): Slurm sends SIGTERM, the
    ranks checkpoint within the grace time, and the requeued job resumes."""

    def preempt(job):
        out = subprocess.run(
            ["sbatch", "--parsable", "-p", "urgent", "-N", "2", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 5"],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr

    _, logs = _interrupted_run_finishes(tmp_path, preempt, total=150)  # Slurm takes seconds to preempt
    assert "(SIGTERM)" in logs


def test_plain_sbatch_script_runs_two_nodes(cluster, tmp_path):
    """The plain sbatch equivalent (what users who prefer sbatch get) trains across both nodes."""
    run = tmp_path / "plain"
    res = run_cli(
        "submit",
        f"train.output_dir={run}",
        "train.max_steps=3",
        "train.eval_every=3",
        *TRAIN,
        "--nodes",
        "2",
        "--dry-run",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = subprocess.run(["sbatch", "--parsable", str(run / "slurm/plain.sbatch")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    from launcher.cluster import slurm

    assert slurm.wait([job], say=lambda *_: None)[job] == "COMPLETED", _logs(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3
    assert load_file(run / "adapter_model.safetensors")
    log = (run / f"slurm/{job}_plain.out").read_text()
    assert f"rendezvous n1:{20000 + int(job) % 20000}" in log


def test_time_limit_requeues_are_bounded_and_nothing_is_lost(cluster, tmp_path):
    """A real time limit: Slurm sends USR2 signal_delay_s before it. With no requeues allowed the
    job ends FAILED after checkpointing; `submit --resume` then finishes the run from there."""

    run = tmp_path / "run"
    common = [
        f"train.output_dir={run}",
        "train.log_every=1",
        "train.save_every=1000",
        "train.eval_every=1000",
        "train.warmup_steps=0",
        "data.max_samples=240",
        "train.micro_batch_size=8",
        "--gpus-per-node",
        "0",
    ]
    # The run is far longer than the limit whatever the machine's speed (400 steps once finished in 12 s,
    # before Slurm's periodic limit check sent the signal); USR2 comes 110 s before the limit, and a
    # USR2 lost in start-up still leaves the limit's own SIGTERM (Reason=TimeLimit), handled the same way.
    res = run_cli(
        "submit",
        *common,
        "train.max_steps=100000",
        "slurm.signal_delay_s=110",
        "--time",
        "2",
        "--max-timeout-requeues",
        "0",
        "--wait",
        timeout=400,
    )
    logs = _logs(run)
    assert res.returncode == 1 and "FAILED" in res.stdout + res.stderr, res.stdout + res.stderr + logs[-3000:]
    assert "timed-out too many times" in logs and "Requeued job" not in logs
    stopped = json.loads((run / "interrupted.json").read_text())["step"]
    assert (run / "checkpoints" / f"step_{stopped:07d}" / "COMPLETE").exists()
    res = run_cli(
        "submit", *common, f"train.max_steps={stopped + 3}", "--time", "10", "--resume", "--wait", timeout=400
    )
    assert res.returncode == 0, res.stdout + res.stderr + _logs(run)[-3000:]
    assert json.loads((run / "summary.json").read_text())["restarts"] == 1
    assert _train_steps(run) == list(range(1, stopped + 4))


def test_scancel_ends_the_job_cancelled_with_its_checkpoint(cluster, tmp_path):
    """A user's scancel sends SIGTERM, as preemption and the hard time limit do: the ranks checkpoint,
    and the task, seeing from Slurm that neither preemption nor the time limit caused it, does not
    requeue. The job ends CANCELLED, stays so, and `submit --resume` continues from the checkpoint."""
    from launcher.cluster import slurm

    run = tmp_path / "run"
    common = [f"train.output_dir={run}", "train.log_every=1", "train.save_every=1000", "train.eval_every=1000", *TRAIN]
    res = run_cli("submit", *common, "train.max_steps=3000", "--nodes", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    job = _job_ids(run)[0]
    _wait_for(lambda: (run / "metrics.jsonl").exists() and len(_train_steps(run)) >= 3, 300, "3 training steps")
    subprocess.run(["scancel", job], check=True)
    assert slurm.wait([job], say=lambda *_: None)[job] == "CANCELLED"
    time.sleep(8)  # a requeue would have brought it back by now
    fields = slurm.job_state(job)
    assert fields["JobState"] == "CANCELLED" and fields["Restarts"] == "0", fields
    _wait_for(lambda: "was cancelled" in _logs(run), 60, "the task's cancel line")
    logs = _logs(run)
    assert "Requeued job" not in logs and "stopped by" not in logs, logs[-3000:]
    stopped = json.loads((run / "interrupted.json").read_text())
    assert stopped["signal"] == "SIGTERM"
    assert (run / "checkpoints" / f"step_{stopped['step']:07d}" / "COMPLETE").exists()
    res = run_cli(
        "submit", *common, f"train.max_steps={stopped['step'] + 2}", "--nodes", "2", "--resume", "--wait", timeout=600
    )
    assert res.returncode == 0, res.stdout + res.stderr + _logs(run)[-3000:]
    assert _train_steps(run) == list(range(1, stopped["step"] + 3))


def test_usr2_while_the_task_starts_is_not_lost(cluster, tmp_path):
    """USR2 sent the moment the job step exists (Python still starting, submitit's handler not yet
    installed) used to kill the task: FAILED with no word. Now the task records it, training stops at
    its first step with a checkpoint, and with no requeues left submitit says so."""
    from launcher.cluster import slurm

    run = tmp_path / "run"
    res = run_cli(
        "submit",
        f"train.output_dir={run}",
        "train.max_steps=3000",
        "train.log_every=1",
        "train.save_every=1000",
        "train.eval_every=1000",
        "data.max_samples=240",
        "train.warmup_steps=0",
        "train.micro_batch_size=8",
        "--gpus-per-node",
        "0",
        "--time",
        "3",
        "--max-timeout-requeues",
        "0",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    job = _job_ids(run)[0]

    def step_started():
        out = subprocess.run(["squeue", "-h", "-s", "-j", job, "-o", "%i"], capture_output=True, text=True).stdout
        return any(
            line.strip().startswith(f"{job}.") and not line.strip().endswith(".batch") for line in out.splitlines()
        )

    _wait_for(step_started, 120, "the job's first step")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    assert slurm.wait([job], say=lambda *_: None)[job] == "FAILED", _logs(run)[-4000:]
    _wait_for(lambda: "timed-out too many times" in _logs(run), 60, "submitit's last word")
    stopped = json.loads((run / "interrupted.json").read_text())["step"]
    assert stopped < 3000 and (run / "checkpoints" / f"step_{stopped:07d}" / "COMPLETE").exists()
