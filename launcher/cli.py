"""`launcher` command line: train, preprocess, configs, submit, sweep, report, validate, fields, generate, merge.

Every command that takes a recipe defaults to the built-in demo, and takes dotted
overrides after it (`launcher train recipe.yaml train.lr=1e-4 peft.r=32`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args, get_origin

from launcher.config.errors import UserError
from launcher.config.recipe import SlurmCfg, describe_fields, load_recipe
from launcher.config.recipe import split_args as _split_recipe_args
from launcher.config.tables import FLOAT_DTYPES, GPUS
from launcher.config.userio import quote
from launcher.plan.archs import PRESETS

if TYPE_CHECKING:  # annotations only
    from launcher.config.recipe import Recipe


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def _count(minimum: int):
    """An argparse type: an integer >= minimum (the flag is named by argparse's message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {quote(text)}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "recipe",
        nargs="*",
        metavar="[RECIPE] [key=value]",
        help="recipe YAML (default: the built-in demo) then dotted overrides; `launcher fields` lists keys",
    )


def _free_port() -> int:
    """A port nobody listens on now, so two local runs never collide on 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_command(recipe: Recipe, recipe_args: list[str], strategy: str, gpu: bool, resume: bool) -> list[str]:
    """One node, several processes: write the accelerate config and launch exactly what a user would.
    (On CPU, `launcher.train.main` sets ACCELERATE_USE_CPU for DDP ranks itself, as for a hand launch.)"""
    from launcher.run import launch_configs

    out = Path(recipe.train.output_dir) / "launch"
    acc = launch_configs.write(recipe, strategy, out, strategy, gpu, "the run's recipe")[0]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(acc),
        "--main_process_port",
        str(_free_port()),
        *(["--max_restarts", str(recipe.dist.max_restarts)] if recipe.dist.max_restarts else []),
        "-m",
        "launcher.train",
        *recipe_args,
    ]
    return cmd + (["--resume"] if resume else [])


def _interrupted_code(recipe: Recipe) -> int:
    """Exit 3 when the run stopped early on a signal (its checkpoint is saved), else 0."""
    from launcher.run import preempt

    stopped = preempt.interrupted(Path(recipe.train.output_dir))
    if stopped:
        print(
            f"interrupted by {stopped['signal']} at step {stopped['step']}; checkpoint saved. "
            "Continue with: launcher train ... --resume",
            file=sys.stderr,
        )
        return 3
    return 0


def _dead_rank(failure, recipe: Recipe, args: argparse.Namespace) -> str:
    """One line: which rank failed and how, the newest complete checkpoint, the command that resumes."""
    from launcher.run import checkpoint

    newest = checkpoint.newest(Path(recipe.train.output_dir))
    saved = f"newest complete checkpoint: {newest}" if newest else "no checkpoint was saved yet"
    again = shlex.join(["launcher", "train", *args.recipe, "--resume"])
    return (
        f"error: rank {failure.rank} (pid {failure.pid} on {failure.host}) {failure.how()}; the other ranks were "
        f"stopped; {saved}; continue with: {again}"
    )


def cmd_train(args: argparse.Namespace) -> int:
    from launcher.run import console, hostmem

    hostmem.prefer_huge_pages()  # before torch is imported here, and for every rank this starts

    if args.quiet or args.verbose:  # the ranks a run starts inherit it
        console.set_level(console.QUIET if args.quiet else console.VERBOSE)
    path, overrides = _split_recipe_args(args.recipe)
    recipe = load_recipe(path, overrides)  # validate before anything heavy, in this process
    if recipe.dist.nnodes > 1:
        raise UserError("dist.nnodes: multi-node runs go through `launcher submit` (Slurm)")
    in_launch = "LOCAL_RANK" in os.environ
    needs_launch = recipe.dist.nproc > 1 or recipe.dist.strategy not in ("auto", "single", "ddp")
    if needs_launch and not in_launch:  # ZeRO/FSDP need accelerate's launcher even for one process
        from launcher.run import placement

        strategy, gpu = placement.for_target(recipe)  # refuse before spawning anything
        if args.resume:  # one error here, not one per rank (the ranks check again, silently passing)
            from launcher.run import resume as resume_contract

            resume_contract.check(Path(recipe.train.output_dir), recipe, lambda _: None)
        cmd = _spawn_command(recipe, args.recipe, strategy, gpu, args.resume)
        console.say(f"launching: {shlex.join(cmd)}")
        from launcher.run import ranks

        started = time.time()
        code, failure = ranks.run(cmd)
        if code == 0:
            return _interrupted_code(recipe)
        summary = Path(recipe.train.output_dir) / "summary.json"
        if failure is not None and summary.exists() and summary.stat().st_mtime >= started:
            print(
                f"note: rank {failure.rank} {failure.how()} after the run had finished ({summary} written); "
                "the run is complete",
                file=sys.stderr,
            )
            return 0
        from launcher.run import watch

        own_line = watch.reported(Path(recipe.train.output_dir), started)  # a rank named the frozen one
        if failure is not None and failure.exitcode != UserError.exit_code and not own_line:  # else it is above
            print(_dead_rank(failure, recipe, args), file=sys.stderr)
        return code
    from launcher.run.train import train

    summary, _ = train(recipe, resume=args.resume)  # it prints the result
    if summary.get("interrupted"):
        return _interrupted_code(recipe)
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    """Tokenize and cache ahead of time (a login node or CPU job); `launcher train` then reads the cache."""
    from launcher.run import tokens
    from launcher.run.model import load_tokenizer, resolve_source

    path, overrides = _split_recipe_args(args.recipe)
    recipe = load_recipe(path, overrides)
    tokenizer = load_tokenizer(resolve_source(recipe.model), recipe.model)
    cached, where = tokens.tokenized(recipe.data, tokenizer, recipe.train.seed)
    print(f"{'already cached' if cached.state == 'hit' else 'tokenized and cached'}: {where}")
    print(json.dumps(cached.stats))
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    from launcher.run import launch_configs

    path, overrides = _split_recipe_args(args.recipe)
    recipe = load_recipe(path, overrides)
    from launcher.run import placement

    strategy, gpu = placement.for_target(recipe, args.device, need_model=False)
    note = f"{path or 'the built-in demo'}" + (f" with {' '.join(overrides)}" if overrides else "")
    for written in launch_configs.write(recipe, strategy, Path(args.out), args.name or strategy, gpu, note):
        print(written)
    return 0


# Every scalar slurm.* field is a flag of submit and sweep (lists and mappings have --setup and --sbatch).
SLURM_FLAGS = tuple(name for name, f in SlurmCfg.model_fields.items() if name not in ("setup", "sbatch_extra"))


def _slurm_flags(args: argparse.Namespace) -> dict[str, tuple[str, object]]:
    """The Slurm flags as typed recipe values (a flag is never re-read as YAML: `--time 2:00:00`
    stays the text 2:00:00), keyed by the slurm.* field each one sets."""
    flags = {
        f"slurm.{k}": (f"--{k.replace('_', '-')}", getattr(args, k))
        for k in SLURM_FLAGS
        if getattr(args, k) is not None
    }
    for item in args.sbatch or []:
        key, sep, value = item.partition("=")
        if not key or "." in key or (sep and not value):
            raise UserError(f"--sbatch {quote(item)}: expected NAME=VALUE or NAME (e.g. --sbatch exclusive)")
        flag = not sep or value == "true"  # `--sbatch exclusive` and `--sbatch exclusive=true`: a bare option
        flags[f"slurm.sbatch_extra.{key}"] = (f"--sbatch {key}", True if flag else value)
    return flags


def _slurm_recipe(args: argparse.Namespace):
    """The recipe with the Slurm flags applied on top (errors name the flag and its slurm.* field)."""
    path, overrides = _split_recipe_args(args.recipe)
    flags = _slurm_flags(args)
    recipe = load_recipe(path, overrides, flags)
    if args.setup:
        recipe.slurm.setup = [*recipe.slurm.setup, *args.setup]
    return path, overrides, flags, recipe


def _finish(job_ids: list[str], wait: bool) -> int:
    if not wait:
        return 0
    from launcher.cluster import slurm

    states = slurm.wait(job_ids)
    failed = {j: st for j, st in states.items() if st != "COMPLETED"}
    for j, st in failed.items():
        print(f"error: job {j} ended {st}", file=sys.stderr)
    return 1 if failed else 0


def cmd_submit(args: argparse.Namespace) -> int:
    from launcher.cluster import slurm

    _, _, _, recipe = _slurm_recipe(args)
    p = slurm.prepare(recipe, resume=args.resume)
    log_dir = p.run_dir / "slurm"
    script = slurm.sbatch_text(p)
    (log_dir / "submit.sbatch").write_text(script)
    if args.dry_run:
        print(f"# sbatch script (saved as {log_dir / 'submit.sbatch'}):")
        print(script)
        print(f"# launch per {'node' if p.shape.launch == 'node' else 'task'} (machine rank, then the command):")
        for rank, cmd in enumerate(slurm.node_commands(p)):
            print(f"{rank}: {cmd}")
        print(f"# the same job as a plain sbatch script: {log_dir / 'plain.sbatch'}")
        print(f"# run directory: {p.run_dir} (recipe.yaml, launch/); nothing submitted")
        return 0
    job = slurm.submit(p)
    print(
        f"submitted job {job.job_id}: {p.shape.nodes} node(s) x {p.shape.per_node} process(es), "
        f"strategy {p.recipe.dist.strategy}"
    )
    print(f"run directory: {p.run_dir}")
    print(f"logs: {log_dir}/{job.job_id}_<task>_log.out and .err (appended across requeues)")
    return _finish([job.job_id], args.wait)


def cmd_sweep(args: argparse.Namespace) -> int:
    from launcher.cluster.sweep import submit_sweep

    path, overrides, flags, _ = _slurm_recipe(args)
    if args.plan:
        from launcher.cluster.sweep import plan_sweep

        print(plan_sweep(path, overrides, args.grid, args.gpu_type, flags))
        return 0
    sweep_dir, job_ids = submit_sweep(
        path, overrides, args.grid, args.out, args.max_parallel, args.dry_run, flags=flags, setup=args.setup or []
    )
    print(f"sweep directory: {sweep_dir}; when done: launcher report {sweep_dir}")
    return _finish(job_ids, args.wait)


def cmd_report(args: argparse.Namespace) -> int:
    from launcher.cluster.sweep import report

    md, written = report(args.sweep_dir, args.out)
    print(md, end="")
    for path in written:
        print(f"wrote {path}")
    return 0


def _add_slurm_args(p: argparse.ArgumentParser) -> None:
    """One flag per scalar slurm.* field, generated from the schema (type, choices and help included)."""
    _add_recipe_args(p)
    g = p.add_argument_group("Slurm (each flag overrides the recipe's slurm.* field)")
    for name in SLURM_FLAGS:
        field = SlurmCfg.model_fields[name]
        kwargs: dict = {"help": (field.description or "").replace("%", "%%")}
        if get_origin(field.annotation) is Literal:
            kwargs["choices"] = list(get_args(field.annotation))
        elif int in (field.annotation, *get_args(field.annotation)):
            kwargs["type"] = int
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, **kwargs)
    g.add_argument("--sbatch", action="append", metavar="NAME=VALUE", help="extra sbatch option (repeatable)")
    g.add_argument(
        "--setup",
        action="append",
        metavar="LINE",
        help="shell line run before the launch, e.g. a module load (repeatable)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the sbatch script and each node's launch; submit nothing"
    )
    p.add_argument("--wait", action="store_true", help="block until the job(s) end; exit non-zero unless all completed")


def _gb(text: str | None, flag: str) -> float | None:
    if text is None:
        return None
    try:
        value = float(str(text).strip().upper().removesuffix("B").removesuffix("I").removesuffix("G"))
    except ValueError:
        value = float("nan")
    if not (0 < value < 1e6):  # also refuses nan and inf
        raise UserError(f"{flag}: expected a positive size in GB such as 80GB or 80, got {quote(text)}")
    return value


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def cmd_plan(args: argparse.Namespace) -> int:
    from launcher.plan import planner, show, throughput
    from launcher.run.placement import Machine

    path, overrides = _split_recipe_args(args.recipe)
    recipe = load_recipe(path, overrides)
    arch = planner.arch_for_recipe(recipe, args.model)
    here = Machine.detect()
    gpu = not args.cpu
    per_node = args.gpus_per_node or (recipe.dist.nproc if args.cpu or not here.gpus else here.gpus)
    kind, kind_note = show.gpu_for(args.gpu_type, _device_name() if here.gpus else None, here.gpu_memory_gb)
    default_gb = here.gpu_memory_gb if here.gpus and not args.gpu_type else kind.memory_gib
    gpu_gb = _gb(args.gpu_memory, "--gpu-memory") or default_gb
    if args.cpu and args.gpu_memory is None:
        import psutil

        gpu_gb = psutil.virtual_memory().total / 2**30 / per_node
    cpu_gb = _gb(args.cpu_memory, "--cpu-memory") or 512.0
    setup = planner.setup_for_recipe(recipe, per_node, args.nodes or recipe.dist.nnodes, gpu)
    plans = planner.plan_all(arch, setup, gpu_gb, cpu_gb)
    best, why = planner.recommend(plans)
    traced, refused = _traces(recipe, arch, setup, plans, gpu_gb) if args.trace else (None, {})
    tokens = args.tokens or throughput.recipe_tokens(recipe.train.max_steps, recipe.train.grad_accum, setup)
    link, network = _gb(args.link_gbs, "--link-gbs"), _gb(args.network_gbs, "--network-gbs")
    timed = show.times(plans, arch, setup, kind, tokens, link, network) if gpu else None
    if args.json:
        out = json.loads(show.as_json(arch, setup, plans, best, why, traced, refused))
        if timed:
            out["time"] = {"gpu_type": kind.name, "tokens": tokens, **timed[1]}
        print(json.dumps(out, indent=1))
        return 0
    print(show.memory_table(arch, setup, plans, why, gpu_gb, cpu_gb))
    if timed:
        print("\n" + timed[0] + (f"\n{kind_note}" if kind_note else ""))
    if traced is not None:
        from launcher import trace

        print("\n" + trace.render(traced, plans, refused, gpu=setup.gpu))
    return 0


def _tokens(text: str) -> int:
    """--tokens: 2e9, 500M, 1.5B, 200k."""
    t = text.strip().upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale != 1 else t) * scale
    except ValueError:
        value = float("nan")
    if not (1 <= value < 1e16):
        raise argparse.ArgumentTypeError(f"expected a token count such as 2e9, 500M or 1.5B, got {quote(text)}")
    return int(value)


def _traces(recipe: Recipe, arch, setup, plans, gpu_gb: float) -> tuple[list, dict]:
    """Trace each planned strategy that can be traced, at the planned world size; (traces, {strategy:
    why not} for those the recipe cannot run under)."""
    from launcher import trace
    from launcher.run import console

    console.quiet_libraries()  # progress on stderr: stdout stays the table (or JSON)
    attn = recipe.model.attn_implementation
    if trace.stand_in(attn) != attn:
        print(
            f"note: {attn} is traced with SDPA's fused kernel (flash-attn is not installed here): "
            "the same memory class, no sequence x sequence scores",
            file=sys.stderr,
        )
    source = trace.source_for(recipe, arch)
    out, refused = [], {}
    for p in plans:
        if p.strategy in trace.TRACEABLE:
            print(f"tracing {p.strategy} on {setup.world} rank(s) ...", file=sys.stderr, flush=True)
            try:
                out.append(trace.trace(recipe, source, p.strategy, setup.world, gpu=setup.gpu, gpu_memory_gb=gpu_gb))
            except UserError as e:
                refused[p.strategy] = " ".join(str(e).split())
    return out, refused


def cmd_validate(args: argparse.Namespace) -> int:
    path, overrides = _split_recipe_args(args.recipe)
    print(load_recipe(path, overrides).to_yaml(), end="")
    return 0


def cmd_fields(args: argparse.Namespace) -> int:
    print(describe_fields())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from launcher.run.export import generate

    for text in generate(args.run_dir, args.prompt, args.max_new_tokens):
        print(text)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from launcher.run.export import merge

    out = merge(args.run_dir, args.out_dir, args.dtype)
    print(f"merged model written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every command and its flags. Long on purpose: a declarative table that reads like `--help`."""
    parser = _Parser(
        prog="launcher",
        description="QLoRA fine-tuning from one recipe.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "train",
        help="fine-tune (several processes when dist.nproc > 1)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="recipe keys:\n" + describe_fields(),
    )
    _add_recipe_args(p)
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint in train.output_dir"
    )
    talk = p.add_mutually_exclusive_group()
    talk.add_argument("-q", "--quiet", action="store_true", help="print only errors and the final result")
    talk.add_argument(
        "-v", "--verbose", action="store_true", help="also data statistics and every library's own warnings and logs"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("preprocess", help="tokenize the recipe's data into the cache ahead of training")
    _add_recipe_args(p)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("configs", help="write the accelerate (and DeepSpeed) config for the recipe's strategy")
    _add_recipe_args(p)
    p.add_argument("--out", default=".", help="writes OUT/accelerate_configs/NAME.yaml and OUT/ds_configs/NAME.json")
    p.add_argument("--name", help="file name without extension (default: the strategy)")
    p.add_argument("--device", choices=["gpu", "cpu"], help="target machine (default: this one)")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("submit", help="submit the recipe to Slurm (multi-node, requeue on time limit/preemption)")
    _add_slurm_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run in train.output_dir")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("sweep", help="submit a grid of recipe variants as Slurm job arrays")
    _add_slurm_args(p)
    p.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="a recipe key (or model, nodes, gpus_per_node, strategy, micro_batch, seq_len, launch) and its values",
    )
    p.add_argument("--out", help="sweep directory (default: the recipe's train.output_dir)")
    p.add_argument("--max-parallel", type=_count(1), default=8, help="at most this many jobs of an array run at once")
    p.add_argument("--plan", action="store_true", help="table every point's memory, time and GPU-hours; submit nothing")
    p.add_argument("--gpu-type", choices=list(GPUS), default="h100", help="the GPU --plan plans for (default h100)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="table (Markdown, CSV) and plots of a sweep's results")
    p.add_argument("sweep_dir")
    p.add_argument("--out", help="where to write report.md/csv and the PNGs (default: the sweep directory)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("plan", help="estimate memory per GPU and per node for every strategy; recommend one")
    _add_recipe_args(p)
    p.add_argument("--model", help="an architecture preset instead of the recipe's model: " + ", ".join(PRESETS))
    p.add_argument("--gpus-per-node", type=_count(1))
    p.add_argument("--nodes", type=_count(1))
    p.add_argument(
        "--gpu-memory", help="per GPU, e.g. 80GB (default: this machine's GPU, else --gpu-type's, else an H100's)"
    )
    p.add_argument("--cpu-memory", help="CPU RAM per node, e.g. 512GB (default 512GB)")
    p.add_argument("--cpu", action="store_true", help="plan CPU processes (gloo) instead of GPUs")
    p.add_argument("--gpu-type", choices=list(GPUS), help="the GPU the time is planned for (default: this machine's)")
    p.add_argument("--tokens", type=_tokens, help="tokens to train, e.g. 2B (default: train.max_steps' rows)")
    p.add_argument("--link-gbs", help="GB/s between GPUs of a node (default: the GPU type's)")
    p.add_argument("--network-gbs", help="GB/s per GPU between nodes (default 25: 200 Gb/s)")
    p.add_argument(
        "--trace",
        action="store_true",
        help="also run the real training step on fake tensors at full size and show its peaks (no GPU needed)",
    )
    p.add_argument("--json", action="store_true", help="the same as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("validate", help="check a recipe and print it fully resolved")
    _add_recipe_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("fields", help="list every recipe key with its type, default and meaning")
    p.set_defaults(func=cmd_fields)

    p = sub.add_parser("generate", help="generate with the base model plus a run's adapter")
    p.add_argument("run_dir")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--max-new-tokens", type=_count(1), default=32)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="dequantize the base, merge the adapter, save a plain transformers model")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=FLOAT_DTYPES, default="bfloat16")
    p.set_defaults(func=cmd_merge)
    return parser


def _capped(message: str, width: int = 400, lines: int = 40) -> str:
    """Each line of an error at most `width` characters, at most `lines` lines: whatever input a
    message quotes, the terminal gets a bounded answer."""
    rows = [r if len(r) <= width else f"{r[: width - 30]}... ({len(r)} characters)" for r in message.splitlines()]
    return "\n".join(rows[:lines] + ([f"... and {len(rows) - lines} more lines"] if len(rows) > lines else []))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `launcher submit recipe.yaml --nodes 2 train.lr=1e-4`: overrides may follow the flags
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "recipe")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.recipe = [*args.recipe, *extra]
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {_capped(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; checkpoints already written are kept", file=sys.stderr)
        return 130
