"""Time and cost of a plan: tokens per second from the step's work and its communication.

Pure arithmetic, like the memory planner. Per token of a QLoRA step the frozen base does its
forward and its input gradient (no weight gradient), once more forward for every recomputed layer;
the adapter does its full backward; attention grows with the sequence. A step's compute is
- its matmul FLOPs at the GPU's bf16 peak times the fraction such steps reach (Gpu.matmul_eff),
- its elementwise work (norms, activations, residuals, casts, dropout) at memory bandwidth,
- the 4-bit weights' dequantization at memory bandwidth: every pass over a layer reads its packed
  weights and writes and re-reads a 16-bit copy (4.5 bytes a weight, counted, not fitted).
Communication runs beside compute (FSDP and ZeRO-3 gather the next layer while this one computes,
DDP reduces buckets during backward): a step takes the longer of the two and the part of the
shorter that does not overlap. Calibrated against published throughputs (bench/published.jsonl;
docs/memory.md "Time" gives each point's error).
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.config import tables
from launcher.plan.archs import Arch
from launcher.plan.planner import OFFLOAD, SHARD_PARAMS, Setup, _checkpointed, _quant_bytes

# Bytes of elementwise traffic per token, per layer, per unit of (hidden + intermediate), per pass
# (forward, recompute, backward): fitted with matmul_eff on the Ampere/Ada runs (26 points).
ELEMENTWISE_BYTES = 60.0
DEQUANT_BYTES = 4.5  # per 4-bit weight per pass: 0.5 read packed, 2 written in 16-bit, 2 read by the matmul
# How much of the shorter of compute and communication hides under the longer: FSDP1 on a PCIe
# machine without P2P overlaps about half (fsdp_qlora's batch-1 runs on 2x3090).
OVERLAP = 0.5
NETWORK_GBS = 25.0  # per GPU across nodes: 200 Gb/s InfiniBand/RoCE per GPU (settable: --network-gbs)


@dataclass(frozen=True)
class Timing:
    flops_per_token: float  # hardware FLOPs, recompute included
    compute_s: float  # one step's compute on one GPU
    comm_s: float  # one step's collectives and host copies on one GPU
    tokens_per_s: float  # all GPUs together
    mfu: float  # the step's matmul FLOPs per second over the GPU's peak

    @property
    def bound(self) -> str:
        return "communication" if self.comm_s > self.compute_s else "compute"

    def hours(self, tokens: float) -> float:
        return tokens / self.tokens_per_s / 3600


def flops_per_token(arch: Arch, s: Setup) -> float:
    """The step's FLOPs per token: 2 per weight for a matmul's forward, 2 for its input gradient, 2 for a
    trained weight's gradient; a recomputed layer's forward again; causal attention's two matmuls."""
    recomputed, _ = _checkpointed(arch, s)
    again = recomputed / arch.layers  # layers run forward twice
    base = 2 * arch.quantized_params * (2 + again)  # forward, input gradient, recompute
    head = 2 * arch.vocab * arch.hidden * 2  # the head's forward and input gradient, never recomputed
    lora = arch.lora_params(s.lora_r, s.targets) * (6 + 2 * again)
    attn = (
        2 * s.seq_len * arch.hidden * arch.layers * (3 + again)
    )  # QK^T and AV over half the sequence, x3 with backward
    return base + head + lora + attn


def comm_bytes(arch: Arch, strategy: str, s: Setup) -> tuple[float, float]:
    """(collective bytes, host-to-device bytes) one rank moves per step."""
    w = s.world
    if w == 1 and strategy not in OFFLOAD:
        return 0.0, 0.0
    lora = arch.lora_params(s.lora_r, s.targets) * 2
    ring = (w - 1) / w
    if strategy in SHARD_PARAMS:
        packed, qstate = _quant_bytes(arch, s, 2)
        params = packed + arch.other_params * 2 + lora  # gathered in forward, again in backward
        collective = ring * (2 * params + lora)  # + the adapter's gradients reduce-scattered
        host = 2 * (params + qstate) / w if strategy in OFFLOAD else 0.0  # each rank copies its shard up, twice
        return collective, host
    return ring * 2 * lora, 0.0  # DDP / ZeRO-2: the adapter's gradients all-reduced


def timing(
    arch: Arch,
    strategy: str,
    s: Setup,
    gpu: tables.Gpu,
    link_gbs: float | None = None,
    network_gbs: float | None = None,
) -> Timing:
    tokens = s.micro_batch * s.seq_len
    f = flops_per_token(arch, s)
    recomputed, _ = _checkpointed(arch, s)
    passes = 2 + recomputed / arch.layers
    hbm = gpu.hbm_gbs * 1e9
    matmuls = tokens * f / (gpu.tflops * 1e12 * gpu.matmul_eff)
    elementwise = tokens * arch.layers * (arch.hidden + arch.intermediate) * ELEMENTWISE_BYTES * passes / hbm
    dequant = arch.quantized_params * DEQUANT_BYTES * passes / hbm if s.quant in ("nf4", "fp4") else 0.0
    compute = matmuls + elementwise + dequant
    collective, host = comm_bytes(arch, strategy, s)
    bw = link_gbs or gpu.link_gbs
    if s.nodes > 1:
        bw = min(bw, network_gbs or NETWORK_GBS)
    comm = collective / (bw * 1e9) + host / (gpu.host_gbs * 1e9)
    step = max(compute, comm) + (1 - OVERLAP) * min(compute, comm)
    return Timing(f, compute, comm, s.world * tokens / step, tokens * f / step / (gpu.tflops * 1e12))


def recipe_tokens(steps: int | None, grad_accum: int, s: Setup) -> int | None:
    """Tokens a run of `steps` optimizer steps trains (rows of seq_len: exact when packed, an upper bound
    otherwise); None without a step count."""
    return steps * grad_accum * s.micro_batch * s.seq_len * s.world if steps else None


def gpu_named(device_name: str, memory_gib: float) -> tables.Gpu | None:
    """The table's GPU for a CUDA device name (torch.cuda.get_device_name), None when it is not in it."""
    n = device_name.lower().replace(" ", "")
    order = [("h200", "h200"), ("h100pcie", "h100-pcie"), ("h100", "h100"), ("a100", "a100"), ("l40s", "l40s"),
             ("6000ada", "a6000-ada"), ("a6000", "a6000"), ("a5000", "a5000"), ("4090", "rtx-4090"),
             ("3090", "rtx-3090")]  # fmt: skip
    for key, name in order:
        if key in n:
            return tables.GPUS["a100-40gb" if name == "a100" and memory_gib < 50 else name]
    return None


def plan_point(recipe, gpu: tables.Gpu, per_node: int, nodes: int, tokens: int | None = None) -> dict:
    """One row of `launcher sweep --plan`: the recipe's strategy (or the one `auto` would pick), whether it
    fits `gpu`, its reserved memory, tokens/s, hours and GPU-hours for its tokens (or per 1B)."""
    from launcher.plan import planner

    arch = planner.arch_for_recipe(recipe)
    s = planner.setup_for_recipe(recipe, per_node, nodes, gpu=True, gpu_memory_gb=gpu.memory_gib)
    plans = planner.plan_all(arch, s, gpu.memory_gib, 1e6)
    chosen = planner.auto_strategy(plans) if recipe.dist.strategy == "auto" else recipe.dist.strategy
    plan = next((p for p in plans if p.strategy == chosen), None) or planner.estimate(arch, chosen, s)
    t = timing(arch, chosen, planner.as_planned(s, plan), gpu)
    tokens = tokens or recipe_tokens(recipe.train.max_steps, recipe.train.grad_accum, s)
    hours = t.hours(tokens or 1e9)
    return {
        "model": arch.name,
        "params_b": round(arch.params / 1e9, 2),
        "strategy": chosen,
        "gpus": s.world,
        "fits": plan.device_total <= gpu.memory_gib,
        "reserved_gb": round(plan.reserved, 1),
        "tokens_per_s": round(t.tokens_per_s),
        "mfu": round(t.mfu, 2),
        "hours": round(hours, 2),
        "gpu_hours": round(hours * s.world, 1),
        "tokens": tokens,
    }
