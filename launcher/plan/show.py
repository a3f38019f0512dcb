"""What `launcher plan` prints: the memory table (terms per strategy, the three totals, whether it
fits), the time table under it, and the same as JSON. Formatting only: the figures come from
planner and throughput."""

from __future__ import annotations

import json
from dataclasses import asdict

from launcher.config import tables
from launcher.plan import throughput
from launcher.plan.archs import Arch
from launcher.plan.planner import Plan, Setup, as_planned
from launcher.plan.throughput import NETWORK_GBS, Timing


def _checkpointing(s: Setup, plans: list[Plan]) -> str:
    if not s.gradient_checkpointing:
        return "off"
    budget = next((p.memory_budget_gb for p in plans if p.memory_budget_gb), None)
    if budget:
        how = "auto: 85% of the GPU's memory" if s.memory_budget_gb == "auto" else "train.memory_budget_gb"
        return f"on, except the last layers that fit {budget:.1f} GB ({how}; layers kept, below)"
    return "on" if s.checkpoint_every == 1 else f"on for 1 layer in {s.checkpoint_every}"


def memory_table(arch: Arch, s: Setup, plans: list[Plan], choice: str, gpu_gb: float, cpu_gb: float) -> str:
    unit = "GPU" if s.gpu else "process"
    lines = [
        f"{arch.name}: {arch.params / 1e9:.2f}B parameters ({arch.quantized_params / 1e9:.2f}B quantized), "
        f"LoRA r={s.lora_r}: {arch.lora_params(s.lora_r, s.targets) / 1e6:.1f}M trainable",
        f"{s.nodes} node(s) x {s.gpus_per_node} {unit}(s), {gpu_gb:g} GB per {unit}, {cpu_gb:g} GB CPU RAM per node; "
        f"micro batch {s.micro_batch} x {s.seq_len} tokens, gradient checkpointing "
        f"{_checkpointing(s, plans)}, {s.optimizer}",
        "",
    ]
    terms = list(plans[0].device) if plans else []
    head = f"{'GB per ' + unit:<22}" + "".join(f"{p.strategy:>14}" for p in plans)
    lines.append(head)
    for term in terms:
        lines.append(f"  {term:<20}" + "".join(f"{p.device[term]:>14.2f}" for p in plans))
    if s.gpu:  # the two figures users read: max_memory_allocated, and max_memory_reserved (OOM messages)
        lines.append(f"  {'= allocated':<20}" + "".join(f"{p.allocated:>14.2f}" for p in plans))
        lines.append(f"  {'= reserved':<20}" + "".join(f"{p.reserved:>14.2f}" for p in plans))
    lines.append(
        f"  {'total' + (' (nvidia-smi)' if s.gpu else ''):<20}" + "".join(f"{p.device_total:>14.2f}" for p in plans)
    )
    lines.append(f"{'CPU RAM per node':<22}" + "".join(f"{p.host_total:>14.2f}" for p in plans))
    lines.append(f"{'fits':<22}" + "".join(f"{'yes' if p.fits else 'no':>14}" for p in plans))
    lines.append(f"{'largest micro batch':<22}" + "".join(f"{p.max_micro_batch:>14}" for p in plans))
    if any(p.memory_budget_gb for p in plans):
        lines.append(f"{'layers kept':<22}" + "".join(f"{f'{p.kept_layers}/{arch.layers}':>14}" for p in plans))
    if any(p.chunked_loss for p in plans):
        lines.append(f"{'loss chunk (tokens)':<22}" + "".join(f"{p.chunked_loss or '-':>14}" for p in plans))
    lines += ["", f"recommended: {choice}"]
    return "\n".join(lines)


def as_json(arch: Arch, s: Setup, plans: list[Plan], best: Plan | None, choice: str, traced=None, refused=None) -> str:
    """`launcher plan --json`: the same values the table shows (and, with --trace, what was traced and
    why the rest was not), one argument each."""
    extra = {} if traced is None else {"traced": [asdict(t) for t in traced], "not_traced": refused or {}}
    return json.dumps(
        {
            "model": asdict(arch),
            "params": arch.params,
            "setup": asdict(s),
            "plans": [
                {
                    **asdict(p),
                    "device_total_gb": round(p.device_total, 3),
                    "allocated_gb": round(p.allocated, 3),
                    "reserved_gb": round(p.reserved, 3),
                    "host_total_gb": round(p.host_total, 3),
                }
                for p in plans
            ],
            "recommended": best.strategy if best else None,
            "why": choice,
            **extra,
        },
        indent=1,
    )


def time_table(
    timings: dict[str, Timing | None], gpu: tables.Gpu, s: Setup, tokens: int | None, link: float, network: float
) -> str:
    """The time rows under the memory table, one column per strategy as there; None: it does not fit."""
    billions = tokens / 1e9 if tokens else 1.0
    what = f"{tokens:,} tokens" if tokens else "per 1B tokens"

    def row(label: str, cell) -> str:
        return f"  {label:<20}" + "".join(f"{cell(t) if t else '-':>14}" for t in timings.values())

    head = (
        f"time on {s.world} x {gpu.name} ({gpu.tflops:g} TFLOPS bf16, matmuls at {gpu.matmul_eff:.2f} of it as "
        f"calibrated on published runs; {link:g} GB/s between GPUs"
        + (f", {network:g} GB/s per GPU between nodes" if s.nodes > 1 else "")
        + f"), {what} (- : does not fit):"
    )
    return "\n".join(
        [
            head,
            f"{'':<22}" + "".join(f"{n:>14}" for n in timings),
            row("tokens/s", lambda t: f"{t.tokens_per_s:,.0f}"),
            row("MFU", lambda t: f"{t.mfu:.2f}"),
            row("bound by", lambda t: t.bound[:13]),
            row("hours", lambda t: f"{t.hours(billions * 1e9):.1f}"),
            row("GPU-hours", lambda t: f"{t.hours(billions * 1e9) * s.world:.1f}"),
        ]
    )


def gpu_for(name: str | None, device_name: str | None, memory_gib: float) -> tuple[tables.Gpu, str]:
    """(the GPU the plan's time is for, a note when it was neither named nor detected): --gpu-type, else
    this machine's GPU where the table knows it, else an H100."""
    if name:
        return tables.GPUS[name], ""
    found = throughput.gpu_named(device_name, memory_gib) if device_name else None
    if found:
        return found, ""
    return tables.GPUS["h100"], "note: times are for an H100; name the GPU with --gpu-type (" + ", ".join(
        tables.GPUS
    ) + ")"


def times(
    plans: list[Plan],
    arch: Arch,
    s: Setup,
    gpu: tables.Gpu,
    tokens: int | None,
    link: float | None,
    network: float | None,
) -> tuple[str, dict]:
    """(the time table, {strategy: figures} for --json) of the plans that fit."""
    link, network = link or gpu.link_gbs, network or NETWORK_GBS
    timings = {
        p.strategy: throughput.timing(arch, p.strategy, as_planned(s, p), gpu, link, network) if p.fits else None
        for p in plans
    }
    per = tokens or 1e9
    figures = {
        k: {**asdict(t), "bound": t.bound, "hours": t.hours(per), "gpu_hours": t.hours(per) * s.world}
        for k, t in timings.items()
        if t
    }
    return time_table(timings, gpu, s, tokens, link, network), figures
