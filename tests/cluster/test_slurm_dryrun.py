"""`launcher submit/sweep --dry-run` and the up-front refusals: no cluster needed."""

import json
import shlex
import subprocess

import pytest
from conftest import ROOT, run_cli

from launcher.cluster import slurm
from launcher.config.errors import UserError
from launcher.config.recipe import load_recipe, time_minutes


def _dry(tmp_path, *args):
    res = run_cli("submit", f"train.output_dir={tmp_path / 'run'}", *args, "--dry-run")
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def _launch_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "accelerate.commands.launch" in line and not line.startswith("srun")]


def test_dry_run_four_nodes_eight_gpus(tmp_path):
    out = _dry(
        tmp_path,
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--partition",
        "gpu",
        "--time",
        "1-00:00:00",
        "--account",
        "proj",
        "--setup",
        "module load cuda/12.4",
        "--sbatch",
        "exclusive=true",
    )
    for flag in (
        "--nodes=4",
        "--gpus-per-node=8",
        "--ntasks-per-node=1",
        "--partition=gpu",
        "--account=proj",
        "--time=1440",
        "--open-mode=append",
        "--signal=USR2@120",
        "--requeue",
        "--exclusive",
    ):
        assert f"#SBATCH {flag}\n" in out, flag
    assert "module load cuda/12.4" in out
    launches = _launch_lines(out)
    assert len(launches) == 4  # one per node
    for rank, line in enumerate(launches):
        args = line.split(": ", 1)[1].split()
        assert args[args.index("--machine_rank") + 1] == str(rank)
        assert args[args.index("--num_machines") + 1] == "4" and args[args.index("--num_processes") + 1] == "32"
        assert "--resume" in args and args[args.index("--main_process_port") + 1] == "<20000+job_id%20000>"
    recipe = load_recipe(str(tmp_path / "run/recipe.yaml"))  # the saved, resolved recipe
    assert (recipe.dist.nnodes, recipe.dist.nproc, recipe.dist.strategy) == (4, 8, "ddp")
    assert (tmp_path / "run/slurm/submit.sbatch").read_text() in out


def test_plain_sbatch_escapes_per_node_variables(tmp_path):
    _dry(tmp_path, "--nodes", "4", "--gpus-per-node", "8")
    script = (tmp_path / "run/slurm/plain.sbatch").read_text()
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    inner = shlex.split(srun)[-1]  # what each task's own bash runs
    assert "$SLURM_NODEID" in inner and "$SLURM_NODEID" not in srun.split("bash -c")[0]
    assert srun.split("bash -c ", 1)[1].startswith("'")  # single quotes: not expanded by the batch shell
    assert "--num_machines 4 --num_processes 32" in inner and 'trap "" USR2' in inner
    assert "MAIN_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))" in script
    assert "#SBATCH --nodes=4" in script and "#SBATCH --gpus-per-node=8" in script


def test_dry_run_one_task_per_gpu(tmp_path):
    out = _dry(tmp_path, "--nodes", "2", "--gpus-per-node", "4", "--launch", "task")
    assert "#SBATCH --ntasks-per-node=4\n" in out and "#SBATCH --gpus-per-task=1\n" in out
    assert "--gpus-per-node" not in out
    launches = _launch_lines(out)
    assert len(launches) == 8 and "--num_machines 8 --num_processes 8 --machine_rank 7" in launches[-1]
    assert "$SLURM_PROCID" in (tmp_path / "run/slurm/plain.sbatch").read_text()


@pytest.mark.parametrize(
    "args, field",
    [
        (["dist.nproc=4", "--gpus-per-node", "8"], "dist.nproc"),
        (["dist.nnodes=3", "--nodes", "2"], "dist.nnodes"),
        (["--sbatch", "ntasks-per-node=4"], "slurm.sbatch_extra.ntasks-per-node"),
        (["--time", "soon"], "slurm.time"),
        (["--launch", "node", "--nodes", "0"], "slurm.nodes"),
        (["--sbatch", "=x"], "--sbatch"),
    ],
)
def test_mismatches_refused_before_submitting(tmp_path, args, field):
    res = run_cli("submit", f"train.output_dir={tmp_path / 'run'}", *args, "--dry-run")
    assert res.returncode == 2 and field in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run/slurm/submit.sbatch").exists()


def test_submit_without_slurm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    p = slurm.prepare(load_recipe(None, [f"train.output_dir={tmp_path / 'run'}", "slurm.gpus_per_node=0"]))
    with pytest.raises(UserError, match="sbatch not found"):
        slurm.submit(p)


def test_refuses_to_submit_over_an_existing_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    res = run_cli("submit", f"train.output_dir={run}", "--dry-run")
    assert res.returncode == 2 and "--resume" in res.stderr


def test_unresolvable_main_node_fails_at_once():
    assert slurm.main_address(["localhost", "n9"]) == "localhost"
    with pytest.raises(RuntimeError, match="cannot resolve the main node"):
        slurm.main_address(["no-such-node.invalid"])


def test_ports_and_times():
    assert slurm.port_for("1234") == slurm.port_for(1234) == 21234
    assert slurm.port_for("20001") != slurm.port_for("20002")
    assert 20000 <= slurm.port_for("987654321") < 40000
    assert [time_minutes(t) for t in ("30", "1:30", "02:00:00", "1-00", "1-01:00:00")] == [30, 2, 120, 1440, 1500]


def test_sweep_dry_run_groups_arrays_by_allocation(tmp_path):
    res = run_cli(
        "sweep",
        "--gpus-per-node",
        "8",
        "--grid",
        "nodes=1,2",
        "--grid",
        "micro_batch=4,8",
        "--out",
        tmp_path / "sw",
        "--dry-run",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "4 runs in 2 array(s)" in res.stdout
    runs = sorted(p.name for p in (tmp_path / "sw").iterdir() if p.name.startswith("p"))
    assert runs == [
        "p000-nodes1-micro_batch4",
        "p001-nodes1-micro_batch8",
        "p002-nodes2-micro_batch4",
        "p003-nodes2-micro_batch8",
    ]
    assert load_recipe(str(tmp_path / "sw" / runs[3] / "recipe.yaml")).train.micro_batch_size == 8


def test_sweep_refuses_invalid_points_before_submitting(tmp_path):
    res = run_cli("sweep", "--grid", "micro_batch=4,-1", "--out", tmp_path / "sw", "--dry-run")
    assert res.returncode == 2 and "train.micro_batch_size" in res.stderr
    assert not (tmp_path / "sw").exists()


def test_committed_plain_sbatch_is_regenerated_exactly(tmp_path):
    res = subprocess.run(["bash", "slurm/regenerate.sh", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "qlora.sbatch").read_text() == (ROOT / "slurm/qlora.sbatch").read_text(), (
        "slurm/qlora.sbatch is stale: run bash slurm/regenerate.sh"
    )
    recipe = load_recipe(str(ROOT / "slurm/example-cluster.yaml"))
    assert recipe.slurm.nodes == 2 and recipe.slurm.sbatch_extra["exclusive"] is True


def test_scaling_example_sweep_dry_run(tmp_path):
    models = "huggyllama/llama-7b,huggyllama/llama-13b,huggyllama/llama-30b,huggyllama/llama-65b"
    res = run_cli(
        "sweep",
        ROOT / "examples/scaling-7b-65b.yaml",
        "--grid",
        f"model={models}",
        "--grid",
        "nodes=1,2,4",
        "--out",
        tmp_path / "scaling",
        "--dry-run",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "12 runs in 3 array(s)" in res.stdout  # one array per node count
    big = next((tmp_path / "scaling").glob("p*-modelllama-65b-nodes4"))
    recipe = load_recipe(str(big / "recipe.yaml"))
    assert (recipe.dist.nnodes, recipe.dist.nproc, recipe.dist.strategy) == (4, 8, "fsdp")
    res = run_cli(
        "plan", ROOT / "examples/scaling-7b-65b.yaml", "--model", "llama-65b", "--gpus-per-node", "8", "--json"
    )
    fsdp = next(p for p in json.loads(res.stdout)["plans"] if p["strategy"] == "fsdp")
    assert fsdp["fits"]


def test_report_table_efficiency_and_plots(tmp_path):
    base = {
        "model": "m",
        "params": 7e9,
        "strategy": "fsdp",
        "micro_batch_size": 1,
        "seq_len": 2048,
        "peak_mem_gb": 20.0,
        "step_s": 1.0,
        "final_loss": 1.0,
        "eval_loss": 1.1,
        "steps": 10,
        "restarts": 0,
    }
    for i, (world, tps) in enumerate([(8, 8000.0), (16, 15200.0), (32, 28800.0)]):
        (tmp_path / f"p{i}").mkdir()
        (tmp_path / f"p{i}/result.json").write_text(
            json.dumps(
                {**base, "run": f"p{i}", "world": world, "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / world}
            )
        )
    res = run_cli("report", tmp_path)
    assert res.returncode == 0, res.stderr
    rows = [line.split(" | ") for line in res.stdout.splitlines() if line.startswith("| p")]
    header = next(line for line in res.stdout.splitlines() if line.startswith("| run")).split(" | ")
    eff = [float(r[header.index("scaling_efficiency")]) for r in rows]
    assert eff == [1.0, 0.95, 0.9]
    assert (tmp_path / "report.csv").read_text().count("\n") == 4
    for name in ("throughput.png", "memory.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_cli("report", empty)
    assert res.returncode == 2 and "no result.json" in res.stderr


@pytest.mark.parametrize(
    "signal_name,fields,cause",
    [
        ("SIGUSR2", {"JobState": "RUNNING", "Restarts": "0"}, "time limit"),  # --signal ahead of the limit
        ("SIGTERM", {"JobState": "RUNNING", "PreemptTime": "2026-11-24T05:37:57", "Restarts": "0"}, "preemption"),
        ("SIGTERM", {"JobState": "COMPLETING", "Reason": "None", "Restarts": "1"}, "preemption"),  # Slurm requeued it
        ("SIGTERM", {"JobState": "PENDING", "Restarts": "1"}, "preemption"),
        ("SIGTERM", {"JobState": "COMPLETING", "Reason": "TimeLimit", "Restarts": "0"}, "time limit"),
        ("SIGTERM", {"JobState": "TIMEOUT", "Restarts": "0"}, "time limit"),
        ("SIGTERM", {"JobState": "COMPLETING", "Reason": "None", "Restarts": "0", "PreemptTime": "None"}, "cancelled"),
        ("SIGTERM", {"JobState": "CANCELLED", "Restarts": "0"}, "cancelled"),
        ("SIGTERM", {"JobState": "UNKNOWN"}, "preemption"),  # Slurm cannot be asked: requeue, lose nothing
    ],
)
def test_stop_cause_from_what_slurm_says(signal_name, fields, cause):
    """As seen on the test cluster at the moment of SIGTERM (scontrol show job)."""
    from launcher.cluster.slurm import stop_cause

    assert stop_cause(signal_name, fields, restarts_at_start=0) == cause


def test_stop_cause_counts_restarts_from_this_attempt():
    """A job already requeued once, cancelled in its second attempt, is cancelled, not preempted."""
    from launcher.cluster.slurm import stop_cause

    assert stop_cause("SIGTERM", {"JobState": "COMPLETING", "Restarts": "1"}, restarts_at_start=1) == "cancelled"
    assert stop_cause("SIGTERM", {"JobState": "COMPLETING", "Restarts": "2"}, restarts_at_start=1) == "preemption"


def test_task_starts_with_usr2_held(tmp_path):
    """The task's command ignores USR2 before Python starts and records it once Python runs: a signal
    that used to kill a starting task is now there for NodeJob to act on."""
    import os

    from launcher.cluster import slurm_boot

    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, signal, sys, time\nfrom launcher.cluster import slurm_boot\n"
        "os.kill(os.getpid(), signal.SIGUSR2)\ntime.sleep(0.2)\nprint(len(slurm_boot.EARLY), sys.argv[1:])\n"
    )
    cmd = f"{slurm_boot.command()} -u -m probe a b"
    res = subprocess.run(
        ["bash", "-c", cmd],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"},
    )
    assert res.returncode == 0 and res.stdout.split() == ["1", "['a',", "'b']"], res.stdout + res.stderr


@pytest.mark.parametrize("how", ["flag", "recipe", "recipe-quoted", "override"])
def test_time_is_hours_in_every_form(tmp_path, how):
    """`2:00:00` is two hours whether it comes as a flag, in a recipe (YAML 1.1 would read 7200) or as an
    override: the plain script says --time=02:00:00 and submitit's says --time=120 (minutes)."""
    recipe = tmp_path / "r.yaml"
    value = '"2:00:00"' if how == "recipe-quoted" else "2:00:00"
    recipe.write_text(
        f"model:\n  name: builtin:tiny-llama\ndata:\n  path: builtin:arithmetic\nslurm:\n  time: {value}\n"
    )
    args = {"flag": ["--time", "2:00:00"], "override": ["slurm.time=2:00:00"]}.get(how, [])
    res = run_cli("submit", recipe, f"train.output_dir={tmp_path / 'run'}", *args, "--dry-run")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "#SBATCH --time=120\n" in res.stdout
    assert "#SBATCH --time=02:00:00\n" in (tmp_path / "run/slurm/plain.sbatch").read_text()
    assert "time: 02:00:00" in (tmp_path / "run/recipe.yaml").read_text()


def test_a_sweep_larger_than_slurms_array_limit_is_split():
    """1,100 runs of one shape at Slurm's default MaxArraySize (1001): two arrays, order kept."""
    from launcher.cluster import sweep

    chunks = sweep.arrays({"shape": list(range(1100)), "other": [7]}, 1001)
    assert [(k, len(m)) for k, m in chunks] == [("shape", 1001), ("shape", 99), ("other", 1)]
    assert [i for k, m in chunks if k == "shape" for i in m] == list(range(1100))


def test_slurm_memory_takes_only_what_sbatch_takes():
    from launcher.config.errors import UserError
    from launcher.config.recipe import load_recipe

    assert load_recipe(None, ["slurm.mem=200g"]).slurm.mem == "200G"
    assert load_recipe(None, ["slurm.mem=64000"]).slurm.mem == "64000"
    for bad in ("200GB", "1.5T", "lots", "-5G"):
        with pytest.raises(UserError, match="slurm.mem: .* is not a Slurm memory size"):
            load_recipe(None, [f"slurm.mem={bad}"])
