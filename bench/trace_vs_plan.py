"""The analytic planner next to the traced training step, at 7B-70B on a fake GPU (no GPU needed).

Each row traces `launcher.trace` for one preset, strategy, world size and setting and prints the
planner's estimate of the same thing: the device peak without the overhead the trace cannot see
(planner.Totals.traceable), and for the offloading strategies the host memory of the offloaded
tensors per rank. JSON lines go to --out; README's table is made from them.

    python bench/trace_vs_plan.py --out trace_vs_plan.jsonl             # the README grid
    python bench/trace_vs_plan.py --models llama-7b --settings 0        # one setting
    python bench/trace_vs_plan.py --check bench/trace_vs_plan.jsonl     # the planner against saved traces

bench/trace_vs_plan.jsonl holds the 112 traces README's table comes from (2-core CPU, Nov 2026); a
planner change is checked against them in seconds (tests/test_trace.py does, in CI).
"""

from __future__ import annotations

import argparse
import json
import sys

GRID_MODELS = ("llama-7b", "llama-13b", "llama-33b", "llama-65b", "llama-2-70b", "llama-3-8b", "llama-3-70b")
# (lora r, micro batch, sequence length, gradient checkpointing)
SETTINGS = ((16, 1, 512, True), (64, 4, 2048, True), (8, 8, 4096, True), (16, 2, 1024, False))
# (strategy, GPUs): one GPU, and sharded over 2 and 8
STRATEGIES = (("single", 1), ("fsdp", 2), ("fsdp", 8), ("fsdp_offload", 2))  # ddp: single + its buckets


def recipe_for(model: str, r: int, mb: int, seq: int, gc: bool, nproc: int, strategy: str):
    from launcher.config.recipe import Recipe

    return Recipe.model_validate(
        {
            "model": {"name": model, "random_init": True},
            "data": {"path": "builtin:arithmetic", "max_seq_len": seq},
            "peft": {"r": r, "alpha": 2 * r},
            # the saved traces' settings: no memory budget, the loss in one piece (not auto), ops unfused
            "train": {
                "micro_batch_size": mb,
                "gradient_checkpointing": gc,
                "memory_budget_gb": None,
                "chunked_loss": 0,
                "fused_ops": False,
            },
            "dist": {"strategy": strategy, "nproc": nproc},
        }
    )


def row(model: str, setting: tuple, strategy: str, world: int) -> dict:
    from launcher import trace
    from launcher.plan import random_model

    r, mb, seq, gc = setting
    recipe = recipe_for(model, r, mb, seq, gc, world, strategy)
    traced = trace.trace(recipe, str(random_model.preset_dir(model)), strategy, world)
    out = {
        "model": model,
        "strategy": strategy,
        "world": world,
        "r": r,
        "micro_batch": mb,
        "seq": seq,
        "checkpointing": gc,
        "traced_device_gb": round(traced.device_total, 3),
        "traced_host_gb": round(traced.host_total, 3),
        "traced": {k: round(v, 3) for k, v in traced.device.items()},
        "seconds": round(traced.seconds, 1),
    }
    out["planned_device_gb"], out["planned_host_gb"] = (round(x, 3) for x in planned(out))
    return out


def planned(r: dict) -> tuple[float, float]:
    """The planner's (device GB less its overhead, offloaded host GB per rank) for a saved trace row."""
    from launcher.plan import planner

    recipe = recipe_for(r["model"], r["r"], r["micro_batch"], r["seq"], r["checkpointing"], r["world"], r["strategy"])
    p = planner.estimate(
        planner.PRESETS[r["model"]], r["strategy"], planner.setup_for_recipe(recipe, r["world"], 1, gpu=True)
    )
    return p.traceable, p.host.get("offloaded_params_and_states", 0.0) / r["world"]


def check(rows: list[dict]) -> list[tuple[float, float | None, dict]]:
    """(device error, host error or None, row) for each saved trace: planned / traced - 1."""
    out = []
    for r in rows:
        device, host = planned(r)
        host_err = host / r["traced_host_gb"] - 1 if r["traced_host_gb"] else None
        out.append((device / r["traced_device_gb"] - 1, host_err, r))
    return out


def summary(errors: list) -> str:
    lines = [
        "| strategy | GPUs | traces | mean abs error | max abs error | offloaded host, max abs error |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for strategy, world in STRATEGIES:
        sel = [(d, h) for d, h, r in errors if r["strategy"] == strategy and r["world"] == world]
        if sel:
            dev = [abs(d) for d, _ in sel]
            host = [abs(h) for _, h in sel if h is not None]
            lines.append(
                f"| {strategy} | {world} | {len(sel)} | {100 * sum(dev) / len(dev):.1f}% | {100 * max(dev):.1f}% | "
                + (f"{100 * max(host):.1f}% |" if host else "- |")
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(GRID_MODELS))
    ap.add_argument("--settings", default=",".join(str(i) for i in range(len(SETTINGS))))
    ap.add_argument("--strategies", default=",".join(f"{s}:{w}" for s, w in STRATEGIES))
    ap.add_argument("--out", help="append JSON lines here")
    ap.add_argument("--check", metavar="JSONL", help="no tracing: the current planner against saved traces")
    args = ap.parse_args()
    if args.check:
        errors = check([json.loads(line) for line in open(args.check)])
        print(summary(errors))
        sys.exit(1 if any(abs(d) > 0.10 or (h is not None and abs(h) > 0.10) for d, h, _ in errors) else 0)
    from launcher.run import console

    console.quiet_libraries()
    for model in args.models.split(","):
        for i in args.settings.split(","):
            for spec in args.strategies.split(","):
                strategy, world = spec.split(":")
                out = row(model, SETTINGS[int(i)], strategy, int(world))
                line = json.dumps(out)
                print(
                    f"{model:12} {strategy:13} x{world} r{out['r']:<3} mb{out['micro_batch']} seq{out['seq']:<5} "
                    f"gc={int(out['checkpointing'])}  traced {out['traced_device_gb']:7.2f}  planned "
                    f"{out['planned_device_gb']:7.2f}  host {out['traced_host_gb']:6.2f}/{out['planned_host_gb']:6.2f}"
                    f"  ({out['seconds']} s)",
                    flush=True,
                )
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(line + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
