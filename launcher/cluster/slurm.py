"""Slurm through submitit: from a recipe to a running (multi-node) job, and back after requeues.

`launcher submit` resolves the recipe for the allocation (nodes, processes per node, strategy),
writes the run directory (recipe.yaml, the accelerate/DeepSpeed config, the sbatch script that
submitit will run and an equivalent plain one) and submits `NodeJob` with submitit.

On the cluster each Slurm task runs `NodeJob.__call__`, which starts one `accelerate launch`:
- launch=node: one task per node; its machine rank is the node id, it starts dist.nproc processes.
- launch=task: one task per GPU (Slurm binds the GPU); each task is its own "machine" of one process.
The rendezvous is the allocation's first node, on a port derived from the job id, so two jobs
sharing a node never collide. Everything per node is computed on that node in Python: nothing
depends on how a batch shell expands variables.

Stopping: training checkpoints on USR2/TERM and leaves `interrupted.json` (see preempt.py). The
task then hands over to submitit's own requeue logic (bounded by slurm.max_timeout_requeues);
the requeued job runs with --resume and continues from the newest complete checkpoint on disk.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.cluster import slurm_boot
from launcher.config.errors import UserError, listing
from launcher.config.recipe import Recipe, load_recipe, save_recipe, time_minutes
from launcher.config.userio import quote
from launcher.run import checkpoint, launch_configs, placement, preempt
from launcher.run import resume as resume_contract

PORT_BASE, PORT_SPAN = 20000, 20000
# sbatch options the launcher sets itself; a recipe may not override them through sbatch_extra.
OWNED = {
    "nodes",
    "ntasks",
    "ntasks-per-node",
    "gpus-per-node",
    "gpus-per-task",
    "gpus",
    "gres",
    "signal",
    "output",
    "error",
    "open-mode",
    "array",
    "time",
    "partition",
    "account",
    "qos",
    "constraint",
    "cpus-per-task",
    "mem",
    "job-name",
}


# What may stand in an `#SBATCH --name=value` line. sbatch splits those lines at whitespace and
# reads quotes its own way, and a newline would end the line and start a shell command, so a
# value with any of these is refused (naming its field) rather than rendered.
SBATCH_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
SBATCH_UNSAFE = re.compile(r"[\s'\"\\`$;]|[\x00-\x1f\x7f]")


def sbatch_problem(field: str, value) -> str | None:
    """Why `value` (from recipe field `field`) cannot go into an #SBATCH line, or None."""
    text = str(value)
    bad = SBATCH_UNSAFE.search(text)
    if text == "" or bad:
        what = "is empty" if text == "" else f"contains {bad.group()!r}"
        return (
            f"{field}: {quote(text)} {what}; an #SBATCH value may not hold whitespace, quotes, "
            "backslashes, $, ; or control characters"
        )
    return None


def sbatch_line(name: str, value) -> str:
    """One `#SBATCH --name[=value]` line of a generated script (values were checked by `resolve`)."""
    if not SBATCH_NAME.fullmatch(name) or (value is not True and sbatch_problem(name, value)):
        raise UserError(f"slurm: cannot render --{quote(name)}={quote(value)} into an sbatch script")
    return f"#SBATCH --{name}" if value is True else f"#SBATCH --{name}={value}"


def _script_problems(recipe: Recipe) -> list[str]:
    """Every recipe value that reaches an #SBATCH line, checked before anything is written."""
    s = recipe.slurm
    out_dir = recipe.train.output_dir
    problems = [
        sbatch_problem(f"slurm.{k}", getattr(s, k))
        for k in ("partition", "account", "qos", "constraint", "mem", "job_name")
        if getattr(s, k) is not None
    ]
    problems.append(sbatch_problem("train.output_dir", out_dir))  # it is --output, and the job name by default
    if "%" in out_dir:
        problems.append(f"train.output_dir: {quote(out_dir)} contains '%', a Slurm file-name pattern in --output")
    for key, value in s.sbatch_extra.items():
        if not SBATCH_NAME.fullmatch(str(key)):
            problems.append(f"slurm.sbatch_extra: {quote(key)} is not an sbatch option name (letters, digits, -)")
        elif not isinstance(value, (str, int, float)) or value is False:
            problems.append(
                f"slurm.sbatch_extra.{key}: {quote(value)} is not an option value (text, a number, or true for a flag)"
            )
        elif value is not True:
            problems.append(sbatch_problem(f"slurm.sbatch_extra.{key}", value))
    return [p for p in problems if p]


def port_for(job_id: str | int) -> int:
    """The rendezvous port of a job: fixed for the job (requeues included), different between jobs."""
    return PORT_BASE + int(str(job_id).split("_")[0]) % PORT_SPAN


@dataclass
class Shape:
    """How a recipe maps onto the allocation."""

    nodes: int
    per_node: int  # training processes per node
    launch: str  # node | task
    gpus_per_node: int

    @property
    def world(self) -> int:
        return self.nodes * self.per_node

    @property
    def machines(self) -> int:  # accelerate "machines": nodes, or every task in task mode
        return self.nodes if self.launch == "node" else self.world

    @property
    def tasks_per_node(self) -> int:
        return 1 if self.launch == "node" else self.per_node


def resolve(recipe: Recipe) -> tuple[Recipe, Shape]:
    """Make dist.* agree with slurm.* (one process per GPU), or refuse naming the field."""
    s, d = recipe.slurm, recipe.dist
    problems = []
    per_node = s.gpus_per_node or d.nproc
    if s.gpus_per_node and "nproc" in d.model_fields_set and d.nproc != s.gpus_per_node:
        problems.append(
            f"dist.nproc: {d.nproc} processes per node but slurm.gpus_per_node={s.gpus_per_node}; "
            "one process per GPU: set them equal (or leave dist.nproc unset)"
        )
    if "nnodes" in d.model_fields_set and d.nnodes != s.nodes:
        problems.append(f"dist.nnodes: {d.nnodes} but slurm.nodes={s.nodes}; set one (slurm.nodes is used)")
    for key in s.sbatch_extra:
        if str(key).replace("_", "-") in OWNED:
            problems.append(
                f"slurm.sbatch_extra.{key}: set by the launcher (from slurm.nodes, slurm.gpus_per_node, "
                "slurm.launch, slurm.time, ...); use those fields instead"
            )
    problems += _script_problems(recipe)
    if problems:
        raise listing("the recipe does not fit the Slurm allocation:", problems)
    recipe = recipe.model_copy(deep=True)
    recipe.dist.nproc, recipe.dist.nnodes = per_node, s.nodes
    recipe.train.output_dir = str(Path(recipe.train.output_dir).resolve())
    return recipe, Shape(s.nodes, per_node, s.launch, s.gpus_per_node)


def executor_parameters(recipe: Recipe, shape: Shape) -> dict:
    """submitit SlurmExecutor parameters for the recipe."""
    s = recipe.slurm
    params = {
        "job_name": s.job_name or Path(recipe.train.output_dir).name,
        "nodes": shape.nodes,
        "ntasks_per_node": shape.tasks_per_node,
        "time": time_minutes(s.time),
        "signal_delay_s": s.signal_delay_s,
        "setup": list(s.setup),
        "additional_parameters": {"requeue": True, **s.sbatch_extra},
    }
    if shape.gpus_per_node and shape.launch == "node":
        params["gpus_per_node"] = shape.gpus_per_node
    elif shape.gpus_per_node:  # task mode: Slurm binds one GPU to each task
        params["gpus_per_task"] = 1
    for key in ("cpus_per_task", "mem", "partition", "account", "qos", "constraint"):
        if getattr(s, key) is not None:
            params[key] = getattr(s, key)
    return params


def launch_argv(run_dir: Path, config: Path, shape: Shape, machine_rank: str, addr: str, port: str) -> list[str]:
    """One `accelerate launch` of the run (the same on every node but for the machine rank)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--num_machines",
        str(shape.machines),
        "--num_processes",
        str(shape.world),
        "--machine_rank",
        machine_rank,
        "--main_process_ip",
        addr,
        "--main_process_port",
        port,
        "-m",
        "launcher.train",
        str(run_dir / "recipe.yaml"),
        "--resume",
    ]


def main_address(hostnames: list[str]) -> str:
    """The allocation's first node, which hosts the rendezvous; fail at once, by name, when this
    node cannot resolve it (torchrun would otherwise wait out its rendezvous timeout)."""
    import socket

    try:
        socket.getaddrinfo(hostnames[0], None)
    except (socket.gaierror, IndexError) as e:
        raise RuntimeError(
            f"cannot resolve the main node {hostnames[:1]} from {socket.gethostname()}: {e}; "
            "the nodes of an allocation must resolve each other's names"
        ) from None
    return hostnames[0]


def stop_cause(signal_name: str, fields: dict, restarts_at_start: int) -> str:
    """Why the job was told to stop, from what Slurm says of it (the signal alone cannot tell: scancel,
    preemption and the hard time limit all send SIGTERM): "preemption", "time limit" or "cancelled".
    Seen on the test cluster (Slurm 24, PreemptMode=REQUEUE): a job being preempted has PreemptTime
    set from the moment of the signal (and Restarts goes up once Slurm has requeued it), a job at its
    limit says Reason=TimeLimit, and a cancelled one has neither. When Slurm cannot be asked, the job
    is treated as preempted: requeueing a cancelled job is the smaller loss."""
    if signal_name != "SIGTERM":  # USR2: Slurm's --signal warning before the time limit
        return "time limit"
    state = fields.get("JobState", "UNKNOWN")
    seen = str(fields.get("Restarts", ""))
    restarts = int(seen) if seen.isdigit() else restarts_at_start
    preempted_at = fields.get("PreemptTime", "None")
    if (
        state == "UNKNOWN"
        or preempted_at not in ("None", "Unknown", "")
        or restarts > restarts_at_start
        or state in ("PENDING", "REQUEUED", "PREEMPTED")
    ):
        return "preemption"
    if fields.get("Reason") == "TimeLimit" or state in ("TIMEOUT", "DEADLINE"):
        return "time limit"
    return "cancelled"


def _ignore_usr2() -> None:
    # accelerate's launcher (torchrun) would die of USR2; the training ranks set their own handler.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class NodeJob:
    """What every Slurm task runs (pickled by submitit). Holds only paths: a requeued job
    reads its state from the run directory, never from what was pickled at submit time."""

    def __init__(self, run_dir: str, config: str, shape: Shape):
        self.run_dir, self.config, self.shape = run_dir, config, shape

    def checkpoint(self, *args, **kwargs):
        """submitit calls this before requeueing: the same job again (training saved its own checkpoint)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def __call__(self) -> dict:
        import submitit

        env = submitit.JobEnvironment()
        run = Path(self.run_dir)
        job_id = os.environ.get("SLURM_JOB_ID", env.job_id)
        rank = env.node if self.shape.launch == "node" else env.global_rank
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
        print(
            f"[launcher] job {env.job_id} task {env.global_rank} node {env.node} ({env.hostname}) machine rank "
            f"{rank} restart {restarts}",
            flush=True,
        )
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler
        # Requeue only once training has saved; meanwhile make sure the ranks hear of the signal.
        signal.signal(signal.SIGUSR2, lambda signum, frame: preempt.request(run))
        if env.global_rank == 0:
            preempt.clear(run)  # before the launch: a request that arrives during startup must stay
            with open(run / "slurm" / "restarts.jsonl", "a") as f:
                f.write(json.dumps({"job": env.job_id, "restart": restarts, "time": time.time()}) + "\n")
        if slurm_boot.EARLY:  # USR2 while this task was starting: stop at the first step, with a checkpoint
            print("[launcher] USR2 arrived while the task was starting; training will checkpoint and stop", flush=True)
            preempt.request(run)
        argv = launch_argv(
            run, Path(self.config), self.shape, str(rank), main_address(env.hostnames), str(port_for(job_id))
        )
        print("[launcher] " + shlex.join(argv), flush=True)
        started = time.time()
        proc = subprocess.Popen(argv, preexec_fn=_ignore_usr2, env={**os.environ, preempt.UNDER_JOB: "1"})
        while proc.poll() is None:  # poll, not wait(): a signal handler may run in between
            time.sleep(0.5)
        stopped = preempt.interrupted(run)
        if stopped:
            print(f"[launcher] training stopped at step {stopped['step']} ({stopped['signal']})", flush=True)
            cause = stop_cause(stopped["signal"], job_state(job_id), restarts)
            if cause == "cancelled":  # scancel: the checkpoint stays, the job ends CANCELLED, no requeue
                print(
                    f"[launcher] job {job_id} was cancelled: checkpoint of step {stopped['step']} kept, not "
                    f"requeued; continue with `launcher submit {run / 'recipe.yaml'} --resume`",
                    flush=True,
                )
                return {"interrupted": stopped, "cancelled": True}
            print(
                f"[launcher] stopped by {cause}: submitit requeues the job (after a time limit at most "
                "slurm.max_timeout_requeues times)",
                flush=True,
            )
            if env.global_rank == 0 and callable(requeue):
                (run / preempt.REQUEST).unlink(missing_ok=True)  # the requeued attempt starts afresh
                requeue(getattr(signal, stopped["signal"], signal.SIGUSR2), None)  # checkpoint(), requeue, exit
            return {"interrupted": stopped}
        summary = run / "summary.json"
        finished = summary.exists() and summary.stat().st_mtime >= started  # written by this attempt
        if proc.returncode and finished:  # a TERM at the very end kills torchrun's agent, not the finished run
            print(f"[launcher] training finished; its launcher exited with {proc.returncode}", flush=True)
        elif proc.returncode:
            raise RuntimeError(
                f"training exited with status {proc.returncode} on {env.hostname}; see {run / 'slurm'} for the logs"
            )
        if env.global_rank == 0:
            return write_result(
                run,
                {
                    "job_id": env.job_id,
                    "nodes": self.shape.nodes,
                    "gpus_per_node": self.shape.gpus_per_node,
                    "launch": self.shape.launch,
                },
            )
        return {}


def write_result(run_dir: Path, extra: dict) -> dict:
    """result.json for a finished run: throughput, memory, loss and the configuration."""
    summary = json.loads((run_dir / "summary.json").read_text())
    recipe = load_recipe(str(run_dir / "recipe.yaml"))
    world = summary["processes"]
    result = {
        "run": run_dir.name,
        "model": recipe.model.name,
        "params": summary["total_params"],
        "strategy": summary["strategy"],
        "world": world,
        "micro_batch_size": recipe.train.micro_batch_size,
        "grad_accum": recipe.train.grad_accum,
        "seq_len": recipe.data.max_seq_len,
        "tokens_per_s": summary["tokens_per_s"],
        "tokens_per_s_per_gpu": round(summary["tokens_per_s"] / world, 1),
        "peak_mem_gb": max(summary["peak_mem_gb_per_rank"]),
        "step_s": summary["step_s"],
        "final_loss": summary["final_loss"],
        "eval_loss": summary["eval_loss"],
        "steps": summary["steps"],
        "restarts": summary["restarts"],
        **extra,
    }
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


@dataclass
class Prepared:
    recipe: Recipe
    shape: Shape
    run_dir: Path
    config: Path
    params: dict  # submitit executor parameters


def make_executor(folder: Path, params: dict, max_timeout_requeues: int):
    """submitit's SlurmExecutor; it needs srun/sbatch, so this is only called to submit."""
    import submitit

    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise UserError(
            "sbatch not found: submitting runs on a Slurm login node (add --dry-run to see the script without Slurm)"
        )
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_timeout_requeues, python=slurm_boot.command())
    executor.update_parameters(**params)
    return executor


def prepare(recipe: Recipe, resume: bool = False) -> Prepared:
    """Check and write the run directory (recipe, accelerate config, plain sbatch); submits nothing."""
    recipe, shape = resolve(recipe)
    run_dir = Path(recipe.train.output_dir)
    checkpoint.check_run_dir(run_dir, resume)
    strategy, gpu = placement.for_target(recipe, "gpu" if shape.gpus_per_node else "cpu", need_model=False)
    recipe.dist.strategy = strategy  # every node runs what was checked here
    if resume:  # before recipe.yaml is rewritten: the checkpoint was trained under the old one
        resume_contract.check(run_dir, recipe, print)
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, run_dir / "recipe.yaml")
    config = launch_configs.write(recipe, strategy, run_dir / "launch", strategy, gpu, f"{run_dir}/recipe.yaml")[0]
    (run_dir / "slurm" / "plain.sbatch").write_text(plain_sbatch(recipe, shape, run_dir, config))
    return Prepared(recipe, shape, run_dir, config, executor_parameters(recipe, shape))


def sbatch_text(p: Prepared) -> str:
    """The script submitit submits for this run, from submitit's own renderer (works without Slurm)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = p.run_dir / "slurm"
    command = f"{slurm_boot.command()} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, **p.params)


def node_commands(p: Prepared) -> list[str]:
    """Each machine's launch as it will run; address and port are known once Slurm allocates."""
    return [
        shlex.join(launch_argv(p.run_dir, p.config, p.shape, str(r), "<first node>", "<port>"))
        .replace("'<first node>'", "<first node>")
        .replace("'<port>'", f"<{PORT_BASE}+job_id%{PORT_SPAN}>")
        for r in range(p.shape.machines)
    ]


def plain_sbatch(recipe: Recipe, shape: Shape, run_dir: Path, config: Path) -> str:
    """The same job as a plain sbatch script (slurm/qlora.sbatch is this for the demo recipe)."""
    from importlib import resources

    s = recipe.slurm
    opts = [("job-name", s.job_name or run_dir.name), ("nodes", shape.nodes), ("ntasks-per-node", shape.tasks_per_node)]
    if shape.gpus_per_node:
        opts.append(("gpus-per-node", shape.gpus_per_node) if shape.launch == "node" else ("gpus-per-task", 1))
    opts += [
        (k.replace("_", "-"), getattr(s, k))
        for k in ("cpus_per_task", "mem", "partition", "account", "qos", "constraint")
        if getattr(s, k) is not None
    ]
    opts += [
        ("time", s.time),
        ("output", f"{run_dir}/slurm/%j_plain.out"),
        ("open-mode", "append"),
        ("signal", f"USR2@{s.signal_delay_s}"),
        ("requeue", True),
        *s.sbatch_extra.items(),
    ]
    rank_var = "$SLURM_NODEID" if shape.launch == "node" else "$SLURM_PROCID"
    launch = shlex.join(launch_argv(run_dir, config, shape, "RANK", "ADDR", "PORT"))
    launch = (
        launch.replace(" RANK ", f" {rank_var} ").replace(" ADDR ", " $MAIN_ADDR ").replace(" PORT ", " $MAIN_PORT ")
    )
    template = resources.files("launcher").joinpath("assets/plain.sbatch").read_text()
    return template.format(
        run_dir=run_dir,
        header=f"{shape.nodes} node(s) x {shape.per_node} process(es), launch={shape.launch}, "
        f"strategy {recipe.dist.strategy}",
        sbatch="\n".join(sbatch_line(k, v) for k, v in opts),
        setup="\n".join(s.setup) or "# (no setup lines)",
        port_base=PORT_BASE,
        port_span=PORT_SPAN,
        srun_launch=shlex.quote('trap "" USR2; exec ' + launch),  # the launcher ignores USR2, ranks handle it
        marker=shlex.quote(str(run_dir / preempt.MARKER)),
        max_requeues=s.max_timeout_requeues,
    )


def submit(p: Prepared):
    executor = make_executor(p.run_dir / "slurm", p.params, p.recipe.slurm.max_timeout_requeues)
    job = executor.submit(NodeJob(str(p.run_dir), str(p.config), p.shape))
    with open(p.run_dir / "slurm" / "jobs.jsonl", "a") as f:
        f.write(json.dumps({"job": job.job_id, "submitted": time.time()}) + "\n")
    return job


def job_state(job_id: str) -> dict:
    """JobState, ExitCode, Restarts from `scontrol show job` (works without accounting)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"JobState": "UNKNOWN"}
    fields = {}
    for line in out.stdout.splitlines()[:1]:
        for item in line.split():
            key, _, value = item.partition("=")
            fields[key] = value
    return fields


FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "UNKNOWN",
}


def wait(job_ids: list[str], poll_s: float = 2.0, say=print) -> dict[str, str]:
    """Block until every job has ended (requeues included); returns the final state of each."""
    last: dict[str, str] = {}
    while True:
        states = {j: job_state(j).get("JobState", "UNKNOWN") for j in job_ids}
        for j, st in states.items():
            if last.get(j) != st:
                say(f"job {j}: {st}")
        last = states
        if all(st in FINISHED for st in states.values()):
            return states
        time.sleep(poll_s)
