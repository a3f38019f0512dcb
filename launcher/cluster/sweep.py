"""Scaling experiments: a grid of recipe variants submitted as Slurm job arrays, and a report.

`launcher sweep RECIPE --grid nodes=1,2 --grid micro_batch=4,8` writes one run directory per
grid point under the sweep directory and submits them as arrays (one array per distinct
allocation shape: Slurm gives every element of an array the same resources). Each finished
job writes `result.json`; `launcher report SWEEP_DIR` turns them into a table and plots.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import subprocess
from pathlib import Path

from launcher.cluster import slurm
from launcher.config.errors import UserError
from launcher.config.recipe import load_recipe
from launcher.config.userio import quote, read_json

# Short grid keys for what scaling experiments vary; any dotted recipe key works too.
ALIASES = {
    "model": "model.name",
    "nodes": "slurm.nodes",
    "gpus_per_node": "slurm.gpus_per_node",
    "strategy": "dist.strategy",
    "micro_batch": "train.micro_batch_size",
    "seq_len": "data.max_seq_len",
    "launch": "slurm.launch",
}
COLUMNS = [
    "run",
    "model",
    "params",
    "strategy",
    "nodes",
    "gpus_per_node",
    "world",
    "micro_batch_size",
    "seq_len",
    "tokens_per_s",
    "tokens_per_s_per_gpu",
    "scaling_efficiency",
    "peak_mem_gb",
    "step_s",
    "final_loss",
    "eval_loss",
    "steps",
    "restarts",
]


def parse_grid(items: list[str], flags: dict | None = None) -> dict[str, list[str]]:
    """--grid KEY=V1,V2 items as {dotted key: values}; a key given twice (under any of its names)
    or also set by a flag is refused, naming both."""
    grid: dict[str, list[str]] = {}
    named: dict[str, str] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UserError(f"--grid {quote(item)}: expected KEY=V1,V2 (e.g. --grid micro_batch=4,8)")
        full = ALIASES.get(key, key)
        if full in named:
            raise UserError(f"--grid {key}: {full} is already varied by --grid {named[full]}; give each key once")
        if full in (flags or {}):
            raise UserError(f"--grid {key}: {full} is also set by {flags[full][0]}; drop one of them")
        values_list = values.split(",")
        if len(set(values_list)) < len(values_list):
            raise UserError(f"--grid {key}: a value is listed twice in {quote(values)}")
        named[full], grid[full] = key, values_list
    return grid


def points(grid: dict[str, list[str]]) -> list[list[str]]:
    """Every combination, as override lists (key=value)."""
    keys = list(grid)
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*(grid[k] for k in keys))]


def _label(overrides: list[str]) -> str:
    short = {v: k for k, v in ALIASES.items()}
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        parts.append(f"{short.get(key, key.split('.')[-1])}{Path(value).name or value}")
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join(parts))[:80]


def submit_sweep(
    recipe_path: str | None,
    overrides: list[str],
    grid_items: list[str],
    out: str | None,
    max_parallel: int,
    dry_run: bool,
    say=print,
    flags: dict | None = None,
    setup: list[str] = (),
) -> tuple[Path, list[str]]:
    """Validate every point first, then write run dirs and submit; returns (sweep dir, job ids).
    The parameters are `launcher sweep`'s flags, one each, as the CLI parsed them."""
    grid = parse_grid(grid_items, flags)
    combos = points(grid)
    recipes, problems = [], []
    for combo in combos:
        try:
            recipes.append(load_recipe(recipe_path, [*overrides, *combo], flags))
        except UserError as e:
            problems.append(f"{' '.join(combo)}: {e}")
    if problems:
        raise UserError("sweep points that are not valid recipes:\n" + "\n".join(problems))
    sweep_dir = Path(out or recipes[0].train.output_dir).resolve()
    if (sweep_dir / "sweep.json").exists() and not dry_run:
        raise UserError(f"--out: {sweep_dir} already holds a sweep; choose another directory")
    prepared = []
    for i, (combo, recipe) in enumerate(zip(combos, recipes)):
        recipe.slurm.setup = [*recipe.slurm.setup, *setup]
        recipe.train.output_dir = str(sweep_dir / f"p{i:03d}-{_label(combo)}")
        prepared.append(slurm.prepare(recipe))
    (sweep_dir / "slurm").mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.json").write_text(
        json.dumps(
            {"grid": grid, "points": [{"run": p.run_dir.name, "overrides": c} for p, c in zip(prepared, combos)]},
            indent=1,
        )
    )
    groups: dict[str, list] = {}
    for p in prepared:
        params = {**p.params, "job_name": sweep_dir.name}  # one name for the sweep's arrays
        groups.setdefault(json.dumps(params, sort_keys=True), []).append(p)
    chunks = arrays(groups, 1001 if dry_run else max_array_size())  # a dry run asks no cluster
    say(f"sweep {sweep_dir}: {len(prepared)} runs in {len(chunks)} array(s), at most {max_parallel} running per array")
    job_ids = []
    for key, members in chunks:
        if dry_run:
            say(f"array of {len(members)}: {', '.join(m.run_dir.name for m in members)}")
            continue
        ex = slurm.make_executor(
            sweep_dir / "slurm",
            {**json.loads(key), "array_parallelism": max_parallel},
            members[0].recipe.slurm.max_timeout_requeues,
        )
        with ex.batch():
            jobs = [ex.submit(slurm.NodeJob(str(m.run_dir), str(m.config), m.shape)) for m in members]
        for m, job in zip(members, jobs):
            say(f"{job.job_id}: {m.run_dir}")
            job_ids.append(job.job_id)
    return sweep_dir, job_ids


def plan_sweep(
    recipe_path: str | None, overrides: list[str], grid_items: list[str], gpu_type: str, flags: dict | None = None
) -> str:
    """`launcher sweep --plan`: every grid point planned (memory, time, GPU-hours) as a Markdown table,
    before anything queues. Nothing is written or submitted."""
    from launcher.config.tables import GPUS
    from launcher.plan.throughput import plan_point

    gpu = GPUS[gpu_type]
    lines = [
        f"planned on {gpu.name} (memory {gpu.memory_gib:g} GB; tokens: train.max_steps' rows, else per 1B)",
        "| point | model | params (B) | strategy | GPUs | fits | reserved GB | tokens/s | MFU | hours | GPU-hours |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    total = 0.0
    for combo in points(parse_grid(grid_items, flags)):
        recipe = load_recipe(recipe_path, [*overrides, *combo], flags)
        if recipe.slurm.gpus_per_node == 0:
            raise UserError(f"{' '.join(combo)}: slurm.gpus_per_node=0 runs on CPUs; --plan plans GPU runs")
        r = plan_point(recipe, gpu, recipe.slurm.gpus_per_node, recipe.slurm.nodes)
        total += r["gpu_hours"] if r["fits"] else 0.0
        lines.append(
            f"| {' '.join(combo)} | {r['model']} | {r['params_b']} | {r['strategy']} | {r['gpus']} | "
            f"{'yes' if r['fits'] else 'NO'} | {r['reserved_gb']} | {r['tokens_per_s']:,} | {r['mfu']} | "
            f"{r['hours']} | {r['gpu_hours']} |"
        )
    return "\n".join([*lines, "", f"GPU-hours of the points that fit: {total:.1f}"])


def max_array_size(default: int = 1001) -> int:
    """Slurm's MaxArraySize (the most elements one job array may have) from `scontrol show config`
    where a cluster answers, else Slurm's default."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=15).stdout
    except (OSError, subprocess.SubprocessError):
        return default
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
    return int(m.group(1)) if m and int(m.group(1)) > 0 else default


def arrays(groups: dict[str, list], limit: int) -> list[tuple[str, list]]:
    """Each allocation shape's runs as arrays of at most `limit` elements (Slurm refuses a larger array
    when it is submitted), in order."""
    return [(key, members[i : i + limit]) for key, members in groups.items() for i in range(0, len(members), limit)]


# What a report reads of each result.json, and the type each must have.
RESULT_FIELDS = {
    "model": str,
    "strategy": str,
    "world": int,
    "micro_batch_size": int,
    "seq_len": int,
    "params": (int, float),
    "tokens_per_s": (int, float),
    "tokens_per_s_per_gpu": (int, float),
    "peak_mem_gb": (int, float),
}


def _result(path: Path) -> dict:
    row = read_json(path, "report")
    for key, typ in RESULT_FIELDS.items():
        if not isinstance(row.get(key), typ) or isinstance(row.get(key), bool):
            got = "missing" if key not in row else quote(row[key])
            raise UserError(
                f"report: {path}: field {key!r} is {got}; expected "
                f"{'text' if typ is str else 'a number'} (rerun or remove that run's result.json)"
            )
    return row


def collect(sweep_dir: Path) -> list[dict]:
    if not Path(sweep_dir).is_dir():
        raise UserError(f"report: {sweep_dir} is not a directory (give a sweep directory)")
    rows = [_result(p) for p in sorted(Path(sweep_dir).rglob("result.json"))]
    if not rows:
        raise UserError(f"{sweep_dir}: no result.json found (have the sweep's jobs finished? `squeue --me`)")
    base: dict[tuple, dict] = {}  # scaling efficiency against the smallest run of the same configuration
    for r in sorted(rows, key=lambda r: r["world"]):
        key = (r["model"], r["strategy"], r["micro_batch_size"], r["seq_len"])
        b = base.setdefault(key, r)
        r["scaling_efficiency"] = (
            round(r["tokens_per_s_per_gpu"] / b["tokens_per_s_per_gpu"], 3) if b["tokens_per_s_per_gpu"] else None
        )
    return sorted(rows, key=lambda r: (r["model"], r["strategy"], r["world"], r["micro_batch_size"], r["seq_len"]))


def tables(rows: list[dict]) -> tuple[str, str]:
    """(Markdown, CSV) of the results."""
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return "\n".join(md) + "\n", buf.getvalue()


def _grouped(rows: list[dict], label, order: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(label(r), []).append(r)
    return {name: sorted(rs, key=lambda r: r[order]) for name, rs in groups.items()}


def _save(fig, axes, path: Path) -> Path:
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plots(rows: list[dict], out: Path) -> list[Path]:
    """Throughput and scaling efficiency against GPU count; peak memory against model size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    label = lambda r: f"{Path(r['model']).name} {r['strategy']} mb{r['micro_batch_size']} s{r['seq_len']}"  # noqa: E731
    for name, rs in _grouped(rows, label, "world").items():
        ax1.plot([r["world"] for r in rs], [r["tokens_per_s"] for r in rs], "o-", label=name)
        ax2.plot([r["world"] for r in rs], [r["scaling_efficiency"] for r in rs], "o-", label=name)
    ax1.set(xlabel="GPUs (processes)", ylabel="tokens/s (all ranks)", title="throughput")
    ax2.set(xlabel="GPUs (processes)", ylabel="tokens/s per GPU vs smallest run", title="scaling efficiency")
    ax2.axhline(1.0, color="grey", lw=0.8, ls="--")
    throughput = _save(fig, [ax1, ax2], out / "throughput.png")

    fig2, ax = plt.subplots(figsize=(6, 4))
    for name, rs in _grouped(rows, lambda r: f"{r['strategy']} x{r['world']}", "params").items():
        ax.plot([r["params"] / 1e9 for r in rs], [r["peak_mem_gb"] for r in rs], "o-", label=name)
    ax.set(xlabel="model parameters (billions)", ylabel="peak memory per GPU (GB)", title="memory")
    memory = _save(fig2, [ax], out / "memory.png")
    plt.close("all")
    return [throughput, memory]


def report(sweep_dir: str, out: str | None = None) -> tuple[str, list[Path]]:
    rows = collect(Path(sweep_dir))
    dest = Path(out or sweep_dir)
    dest.mkdir(parents=True, exist_ok=True)
    md, csv_text = tables(rows)
    (dest / "report.md").write_text(md)
    (dest / "report.csv").write_text(csv_text)
    return md, [dest / "report.md", dest / "report.csv", *plots(rows, dest)]
