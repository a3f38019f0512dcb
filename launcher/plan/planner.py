"""Memory planner: will this model, strategy and GPU count fit, and with what micro batch?

Every estimate is a sum of named terms (bytes), per GPU and per node's CPU RAM, so a user sees
*why* a plan does or does not fit. On GPUs the terms follow what the traced training step holds
(launcher.trace: the launcher's own step run at full size on fake tensors):

- 4-bit weights: the packed weights (2 values per byte), split under ZeRO-3/FSDP, plus the
  quantization state (8-bit absmax per 64 values and an fp32 one per 256 blocks under double
  quantization: 0.127 bits per parameter; fp32 per 64 without), which no strategy splits.
- unquantized parameters (embeddings, lm_head, norms, biases): fp32 where
  prepare_model_for_kbit_training upcasts them (single, ddp, zero2), else the parameter dtype.
- LoRA parameters and gradients in the adapter's dtype (fp32 when upcast; the 4-bit layers'
  compute dtype otherwise), DDP's buckets, and the optimizer state (bitsandbytes: 8 or 2 bytes per
  parameter; torch AdamW, which replaces it under FSDP2 and offloading: 2 moments in the adapter's dtype).
- gathered parameters under ZeRO-3/FSDP: the root's embeddings and head for the whole step, one layer.
- activations kept for backward, and the largest transient (the loss over the logits, a
  recomputed layer's backward, or the all-gather buffer): GPU_FIT, fitted to traces.
- what a trace cannot see, each its own term: the layer FSDP/ZeRO-3 gathers ahead (prefetch), the
  caching allocator's slack (what `max_memory_reserved` adds to `max_memory_allocated`), the CUDA
  context and NCCL's buffers (what nvidia-smi adds to both); on CPU, the resident size of a process
  with the libraries imported.

Each GPU plan therefore gives three totals: `allocated` (tensors: what the trace and
`max_memory_allocated` count), `reserved` (`max_memory_reserved`, what the OOM message reports) and
`device_total` (the process on nvidia-smi), and a plan fits by the last.

CPU plans keep their own activation constants, calibrated against measured resident memory
(tests/test_planner.py checks the CPU models within 15%), allocator slack included.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from launcher.config import tables
from launcher.config.errors import UserError
from launcher.plan.archs import HUB, PRESETS, Arch
from launcher.plan.source import model_config, resolve_source

if TYPE_CHECKING:  # annotations only
    from launcher.config.recipe import Recipe

GB = 2**30
STRATEGIES = tuple(tables.STRATEGIES)
SHARD_PARAMS = set(tables.SHARDED)  # parameters split over the ranks
SHARD_STATES = {s.name for s in tables.STRATEGIES.values() if s.shards_states}  # gradients, optimizer state too
OFFLOAD = set(tables.OFFLOAD)  # parameters and optimizer state on CPU
# Preference when several fit: least communication first (see recommend()).
PREFERENCE = ("single", "ddp", "zero2", "fsdp", "zero3", "fsdp_offload", "zero3_offload")
OPTIMIZER_BYTES = {o.name: o.state_bytes for o in tables.OPTIMIZERS.values()}

# Calibration (bench/plan_vs_measured.py, 2-core CPU, fp32, a 108M model with batch 1-8 x 256
# tokens, checkpointing on and off): what one decoder layer keeps for backward per token, as
# multiples of hidden and intermediate size in the activation dtype (LoRA dropout copies and
# masks included; counting the saved tensors of a LoRA layer gives ~17.5 h + 5.3 f, the rest is
# temporaries), and bytes per logit element (the logits the output keeps, log-softmax, its
# gradient and the logits' gradient: ~6 fp32 copies at the peak). Not yet calibrated on GPU.
ACT_HIDDEN, ACT_INTER = 20.0, 8.5
LOGIT_BYTES = 24.0
# What nvidia-smi shows beyond the caching allocator's segments (neither is in max_memory_reserved):
# the CUDA context with cuBLAS/cuDNN loaded (0.3-0.6 GB on Ampere/Hopper with CUDA 12, lazy module
# loading) and NCCL's channel buffers (NCCL_BUFFSIZE 4 MiB x send/receive x up to 32 channels, more
# with the tree and proxy buffers across nodes). Documented sizes, not measured by us.
CUDA_CONTEXT_GB = 0.5
NCCL_GB = {1: 0.25, 2: 0.5}  # by whether the ranks span one node or several
# The caching allocator's reserved segments beyond the allocated peak, as a fraction of what is
# allocated and freed during the step (activations, transients, gathered layers): freed blocks
# are split and cached, and a later, larger request takes a new segment. Fitted to the published
# reserved figures in bench/published.jsonl (docs/memory.md, "Against published figures").
ALLOCATOR_SLACK = 0.25
# ... of which this much cannot be given back: split segments still partly in use. Near the device's
# limit the allocator frees its cached blocks and retries before it raises OOM, so the reserved peak
# is capped by the device, and a plan fits while the allocated peak, this floor, the context and
# NCCL fit (the published runs that filled a 24 GB card need 0.83-0.99 of it by this count).
SLACK_FLOOR = 0.05
# Layers gathered ahead of the one computing: FSDP2's implicit prefetch issues the next all-gather
# only; FSDP1 under accelerate (limit_all_gathers, BACKWARD_PRE) likewise keeps one in flight, which
# fsdp_qlora's published allocated peaks (FSDP1) bear out: two layers ahead would put the planner
# 12% over them, one puts it 7-8% over. ZeRO-3's prefetch bucket is about one layer by default.
PREFETCH_LAYERS = {1: 1, 2: 1}
# `auto` settings (resolve()): a GPU's memory budget keeps back 15%, the planner's error against every
# published reserved figure it is scored on (bench/published.jsonl); the chunked loss splits the micro
# batch's tokens in 8 (torchtune's default) of at least 128 tokens (what the CPU benchmark ran).
AUTO_BUDGET = 0.85
AUTO_CHUNKS, MIN_CHUNK = 8, 128
AUTO_CHUNK_GAIN = 0.05  # ... where that takes at least 5% off the planned peak (the demo's logits: 0.2%)
CPU_PROCESS_GB = 0.5  # resident size of a CPU training process without model and batch (measured 0.47)
GPU_PROCESS_HOST_GB = 3.0  # host RAM of a CUDA training process (libraries, pinned buffers)


@dataclass
class Setup:
    """What the plan depends on besides the architecture (filled from a recipe by `from_recipe`)."""

    micro_batch: int = 1
    seq_len: int = 2048
    lora_r: int = 16
    targets: object = "all-linear"
    optimizer: str = "paged_adamw_32bit"
    gradient_checkpointing: bool = True
    checkpoint_every: int = 1  # recompute every n-th layer; the others keep their activations
    memory_budget_gb: float | str | None = None  # keep the last layers' activations while the plan fits this; auto
    kept_layers: int | None = None  # layers keeping their activations (decided from the budget)
    chunked_loss: int | str = 0  # the loss over this many tokens at a time: the logits never exist in full; auto
    quant: str = "nf4"  # nf4 | fp4 | int8 | none
    double_quant: bool = True
    gpu: bool = True  # False: CPU processes (fp32 everywhere)
    gpus_per_node: int = 1
    nodes: int = 1
    fsdp_version: int = 2  # FSDP1 or FSDP2: what each gathers ahead is PREFETCH_LAYERS
    fused_ops: bool = False  # train.fused_ops: fewer bytes per kept layer (FUSED_SAVED); other tools: False
    # What other tools do differently, for scoring the planner against their published figures:
    kbit_upcast: bool | None = None  # None: the launcher's choice (upcast unless parameters are sharded)
    logit_bytes: float | None = None  # the loss's bytes per logit element, where it is not the launcher's
    gpu_memory_gb: float | None = None  # the device's memory: caps the reserved figure (see SLACK_FLOOR)

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


NOT_ALLOCATED = ("allocator_slack", "cuda_context", "nccl_buffers")  # outside max_memory_allocated
NOT_RESERVED = ("cuda_context", "nccl_buffers")  # outside max_memory_reserved


class Totals:
    """GB summed over the per-device and per-host terms."""

    device: dict
    host: dict

    @property
    def device_total(self) -> float:
        """Everything the device holds: nvidia-smi's figure for a GPU process."""
        return sum(self.device.values())

    @property
    def allocated(self) -> float:
        """Live tensors at the peak: `torch.cuda.max_memory_allocated`."""
        return sum(v for k, v in self.device.items() if k not in NOT_ALLOCATED)

    @property
    def traceable(self) -> float:
        """What `launcher plan --trace` can see: the allocated tensors less the prefetched layer (on one
        stream with collectives that do nothing, nothing is gathered ahead)."""
        return self.allocated - self.device.get("prefetch", 0.0)

    @property
    def reserved(self) -> float:
        """The caching allocator's segments at the peak: `torch.cuda.max_memory_reserved`."""
        return sum(v for k, v in self.device.items() if k not in NOT_RESERVED)

    @property
    def host_total(self) -> float:
        return sum(self.host.values())


@dataclass
class Plan(Totals):
    strategy: str
    device: dict[str, float] = field(default_factory=dict)  # GB per GPU (per process on CPU)
    host: dict[str, float] = field(default_factory=dict)  # GB of CPU RAM per node
    fits: bool | None = None
    max_micro_batch: int | None = None
    why: str = ""
    kept_layers: int = 0  # decoder layers that keep their activations instead of recomputing them
    chunked_loss: int = 0  # tokens a chunk of the loss (0: the logits in one piece), auto decided
    memory_budget_gb: float | None = None  # the budget the kept layers fit, auto decided


@dataclass(frozen=True)
class GpuFit:
    """What the traced GPU step holds beyond its parameters and states (bytes), by whether k-bit
    training upcasts (fp32 residual stream and adapter: single, ddp, zero2) or not (sharded, bf16)."""

    layer_h: float  # one layer's saved activations per token, per hidden unit
    layer_f: float  # ... per intermediate unit
    logit: float  # the loss's transient per logit element (the logits, their fp32 copy, softmax, gradients)
    layer: float  # a recomputed layer's transient in backward, in units of its saved activations
    dequant: float  # dequantized copies of the largest 4-bit weight alive at once (compute dtype)


# Fitted to traces of the launcher's real step (bench/trace_vs_plan.py: 7 Llama presets x 4
# settings x single, fsdp on 2 and 8 GPUs, fsdp_offload; README "Planner vs trace").
# Fitted (random search on the largest relative error, rounded) over 112 traces: within 4.1% for
# the upcast class and 3.5% for the sharded one. The logit constants are about 3 fp32 copies
# (logits, log-softmax, gradient); a layer's saved activations per token come to ~20 f + 70 h bytes
# with the fp32 residual stream and adapter, ~4 f + 58 h in bf16 (the h/f split is loosely
# determined: Llama's f/h ratio only spans 2.7-3.5); one or two dequantized copies of the largest
# 4-bit weight sit next to a layer's backward.
GPU_FIT = {True: GpuFit(70.0, 20.0, 11.7, 1.1, 1.0), False: GpuFit(57.6, 3.7, 11.9, 1.15, 1.38)}
# What train.fused_ops takes off a layer's saved activations, bytes per token per (hidden, intermediate)
# unit, read off traces of the real step with and without it (Llama-3-8B and Llama-2-7B, 2048 tokens,
# nothing recomputed; exact at both shapes; the CPU's fp32 step at 100M likewise): SwiGLU's act(gate)
# goes (fp32 with the upcast and on CPU, bf16 sharded), and where the residual stream is bf16 so does
# the norm's fp32 copy of its input (an fp32 input is not copied, and the product with the frozen
# weight keeps nothing). The fits above were made without it (the saved traces, others' figures).
FUSED_SAVED = {True: (0.0, 4.0), False: (4.0, 2.0)}


def _quant_bytes(arch: Arch, s: Setup, dtype: int) -> tuple[float, float]:
    """(packed weights, quantization state) in bytes: 2 values per byte plus an absmax per 64 values
    (8-bit with a second-level fp32 absmax per 256 blocks under double quantization)."""
    n = arch.quantized_params
    if s.quant in ("nf4", "fp4"):
        return n / 2, n * (8 / 64 + 32 / (64 * 256) if s.double_quant else 32 / 64) / 8
    return n * (1 if s.quant == "int8" else dtype), 0.0


def estimate(arch: Arch, strategy: str, s: Setup) -> Plan:
    """Peak memory per GPU and CPU RAM per node, term by term (GB)."""
    s = resolve(arch, strategy, s)
    if s.memory_budget_gb and s.kept_layers is None and s.gradient_checkpointing:
        s = replace(s, kept_layers=layers_to_keep(arch, strategy, s))
    world = s.world
    dtype = 2 if s.gpu else 4  # compute/parameter dtype bytes: bf16 on GPU, fp32 on CPU
    upcast = s.quant != "none" and (strategy not in SHARD_PARAMS if s.kbit_upcast is None else s.kbit_upcast)
    shard = world if strategy in SHARD_PARAMS else 1
    state_shard = world if strategy in SHARD_STATES else 1
    offload = strategy in OFFLOAD
    lora = arch.lora_params(s.lora_r, s.targets)
    lora_dtype = 4 if upcast else dtype  # peft upcasts the adapter only for k-bit training
    adamw = tables.bnb_optimizer_refused(strategy, s.optimizer) or s.optimizer == "adamw_torch"
    opt = 2 * lora_dtype if adamw else OPTIMIZER_BYTES.get(s.optimizer, 8)  # torch AdamW: 2 moments, param dtype

    packed, qstate = _quant_bytes(arch, s, dtype)
    other = arch.other_params * (4 if upcast else dtype)
    lora_b, grads, states = lora * lora_dtype, lora * lora_dtype, lora * opt
    if strategy == "ddp":
        grads *= 2  # DDP's buckets: a flat copy of the gradients
    device = {
        # the quantization state is a module attribute, not a parameter: no strategy shards it
        "weights_4bit" if s.quant in ("nf4", "fp4") else "weights": 0.0 if offload else packed / shard + qstate,
        "unquantized_params": 0.0 if offload else other / shard,
        "lora_params": 0.0 if offload else lora_b / shard,
        "gradients": grads / state_shard,
        "optimizer_states": 0.0 if offload else states / state_shard,
        **(_gpu_work(arch, strategy, s, upcast) if s.gpu else _cpu_work(arch, strategy, s, upcast)),
    }
    if s.gpu:
        device.update(_gpu_margins(arch, strategy, s, device))
    else:
        device["framework_overhead"] = CPU_PROCESS_GB * GB
    per_node = s.gpus_per_node
    host = {"processes": (GPU_PROCESS_HOST_GB * GB if s.gpu else 0.0) * per_node}
    if offload:  # this node's ranks hold their shards of parameters and optimizer state
        host["offloaded_params_and_states"] = (packed + qstate * world + other + lora_b + states) * per_node / world
    if s.gpu:
        # Loading streams a checkpoint shard at a time (<= 5 GB in 16-bit on the hub) per reading
        # process; with sharded parameters one process per node reads.
        readers = 1 if strategy in SHARD_PARAMS else per_node
        host["loading_buffers"] = readers * min(5 * GB, arch.params * 2)
    else:  # a CPU "GPU" is the process itself: the device terms are host memory
        host["cpu_processes"] = sum(device.values()) * per_node
    return Plan(
        strategy,
        {k: round(v / GB, 3) for k, v in device.items()},
        {k: round(v / GB, 3) for k, v in host.items()},
        kept_layers=_checkpointed(arch, s)[1],
        chunked_loss=int(s.chunked_loss),
        memory_budget_gb=s.memory_budget_gb,  # type: ignore[arg-type]  # resolved: a number or None
    )


def resolve(arch: Arch, strategy: str, s: Setup) -> Setup:
    """The setup with its `auto` settings decided, the one place they are (the run's placement and the
    plan read this):
    - memory_budget_gb: with every layer checkpointed, on a GPU AUTO_BUDGET of its memory; on CPU what
      recomputing every layer needs (so the layers kept are those that cost nothing: the last one,
      where the loss's transient is smaller than a layer's backward);
    - chunked_loss: the micro batch's tokens in AUTO_CHUNKS chunks (at least MIN_CHUNK tokens each)
      where that takes AUTO_CHUNK_GAIN off the planned peak (on a GPU: the logits are the step's
      largest transient) and the strategy takes it (not where parameters are sharded)."""
    budget, chunk = s.memory_budget_gb, s.chunked_loss
    if budget == "auto":
        budget = None
        if s.gradient_checkpointing and s.checkpoint_every == 1:
            if s.gpu and s.gpu_memory_gb:
                budget = AUTO_BUDGET * s.gpu_memory_gb
            elif not s.gpu:
                budget = estimate(arch, strategy, replace(s, memory_budget_gb=None)).device_total
    if chunk == "auto":
        chunk = 0
        tokens = s.micro_batch * s.seq_len
        size = max(MIN_CHUNK, tokens // AUTO_CHUNKS)
        if strategy not in SHARD_PARAMS and size < tokens:
            whole = replace(s, memory_budget_gb=None, chunked_loss=0, kept_layers=None)
            peak = estimate(arch, strategy, whole).allocated
            chunked = estimate(arch, strategy, replace(whole, chunked_loss=size)).allocated
            chunk = size if chunked < (1 - AUTO_CHUNK_GAIN) * peak else 0
    return (
        s
        if (budget, chunk) == (s.memory_budget_gb, s.chunked_loss)
        else replace(s, memory_budget_gb=budget, chunked_loss=chunk)
    )


def layers_to_keep(arch: Arch, strategy: str, s: Setup) -> int:
    """How many decoder layers (the last ones) may keep their activations while the plan stays within
    s.memory_budget_gb: the rest recompute in backward. 0 when even full recompute does not fit. A scan, not
    a bisection: keeping every layer can plan below keeping all but one (no recomputed layer's transient)."""
    budget = float(s.memory_budget_gb or 0.0)  # resolved by estimate(): a number
    totals = {k: estimate(arch, strategy, replace(s, kept_layers=k)).device_total for k in range(arch.layers + 1)}
    fits = [k for k, total in totals.items() if total <= budget]
    return max(fits, default=0)


def _loss_tokens(s: Setup, strategy: str) -> int:
    """Tokens whose logits exist at once: the micro batch, or one chunk of the chunked loss (which the
    sharded strategies refuse)."""
    tokens, chunk = s.micro_batch * s.seq_len, int(s.chunked_loss)  # resolved by estimate(): a number
    return min(tokens, chunk) if chunk and strategy not in SHARD_PARAMS else tokens


def _checkpointed(arch: Arch, s: Setup) -> tuple[int, int]:
    """(layers recomputed in backward, layers keeping all their activations)."""
    if not s.gradient_checkpointing:
        return 0, arch.layers
    if s.kept_layers is not None:
        kept = min(s.kept_layers, arch.layers)
        return arch.layers - kept, kept
    recomputed = -(-arch.layers // s.checkpoint_every)  # layers 0, n, 2n, ... (transformers' every_n_layers)
    return recomputed, arch.layers - recomputed


def _layer_work(s: Setup, recomputed: int, kept: int, recompute: float, layer: float, backward: float) -> float:
    """What a layer's backward adds to the activations kept at the end of forward: `recompute` for a
    recomputed layer (its activations again, and their gradients), `backward` x `layer` for a kept one.
    Where the kept layers are the last ones (a memory budget's), backward frees them before it
    recomputes any layer, so that layer's transient only counts beyond them: the first kept layer costs
    nothing (100m on CPU, live tensors: 0.187 GB keeping 0 or 1 layer, 0.234 keeping 2); under
    checkpoint_every the kept layers sit between the recomputed ones and are all still there."""
    work = recompute if recomputed else 0.0
    if kept and (s.kept_layers is not None or not recomputed):
        work = max(work - kept * layer, backward * layer)
    return work


def _gpu_work(arch: Arch, strategy: str, s: Setup, upcast: bool) -> dict:
    """What the step holds on a GPU beyond parameters and states, as the trace shows it: the
    activations kept for backward, the layers FSDP/ZeRO-3 gather (the root's embeddings and head for
    the whole step, plus one layer), and the largest transient: the loss over the logits, a layer
    recomputed and back-propagated, or an all-gather's buffer."""
    fit, tokens = GPU_FIT[upcast], s.micro_batch * s.seq_len
    resid = 4 if upcast else 2  # the residual stream follows the (upcast) embedding dtype
    saved_h, saved_f = FUSED_SAVED[upcast] if s.fused_ops else (0.0, 0.0)
    full_layer = tokens * ((fit.layer_h - saved_h) * arch.hidden + (fit.layer_f - saved_f) * arch.intermediate)
    recomputed, kept = _checkpointed(arch, s)
    layer_work = _layer_work(s, recomputed, kept, fit.layer * full_layer, full_layer, fit.layer - 1)
    gathered = 0.0
    if strategy in SHARD_PARAMS:
        root = (arch.other_params - 2 * arch.layers * arch.hidden) * 2  # embeddings, head, final norm
        gathered = root + _gathered_layer(arch, s)
    activations = recomputed * tokens * arch.hidden * resid + kept * full_layer
    if s.quant == "int8" and recomputed:
        # bitsandbytes' int8 matmul keeps its input on the autograd context (ctx.tensors), outside
        # save_for_backward, so checkpointing does not drop it: every recomputed layer keeps the
        # inputs of its linears (attention's, o_proj's, the MLP's and down_proj's: 3 h + f per token)
        # in the residual dtype, as the int8 trace shows (launcher plan --trace, docs/memory.md).
        activations += recomputed * tokens * (3 * arch.hidden + arch.intermediate) * resid
    biggest = max(i * o for i, o in arch.linears().values())
    dequant = fit.dequant * biggest * 2 if s.quant != "none" else 0.0  # bf16 copies of the largest weight
    work = max(
        _loss_tokens(s, strategy) * arch.vocab * (s.logit_bytes or fit.logit),
        layer_work + dequant,
    )
    # At the start of forward the root's all-gather buffer sits next to its gathered copy, before
    # any activation exists: the peak of small steps under FSDP.
    return {"gathered_params": gathered, "activations": activations, "transient": max(work, gathered - activations)}


def _gathered_layer(arch: Arch, s: Setup) -> float:
    """One decoder layer as FSDP/ZeRO-3 gathers it: its packed weights and its adapter in 16-bit."""
    packed, _ = _quant_bytes(arch, s, 2)
    return packed / arch.layers + arch.lora_params(s.lora_r, s.targets) / arch.layers * 2


def _gpu_margins(arch: Arch, strategy: str, s: Setup, device: dict) -> dict:
    """What a GPU holds that the trace (fake tensors, one stream, collectives that do nothing) cannot
    show. Prefetch: the next layer gathered while this one computes: FSDP2's implicit prefetch and
    ZeRO-3's prefetch bucket keep one more layer, FSDP1 with BACKWARD_PRE and limit_all_gathers two
    (the prefetched layer, and the last one until its reduce-scatter ends). Modelled from the
    libraries' documented behaviour; no GPU run of ours has measured it yet."""
    prefetch = 0.0
    if strategy in SHARD_PARAMS and s.world > 1:
        prefetch = _gathered_layer(arch, s) * (PREFETCH_LAYERS[s.fsdp_version] if strategy in tables.FSDP else 1)
    churn = device["activations"] + device["transient"] + device["gathered_params"] + prefetch
    margins = {
        "prefetch": prefetch,
        "cuda_context": CUDA_CONTEXT_GB * GB,
        "nccl_buffers": NCCL_GB[min(s.nodes, 2)] * GB if s.world > 1 else 0.0,
    }
    slack = ALLOCATOR_SLACK * churn
    if s.gpu_memory_gb:  # the allocator gives its cache back before it fails
        room = (
            (s.gpu_memory_gb - 0.01) * GB - sum(device.values()) - sum(margins.values())
        )  # 0.01: the table's rounding
        slack = max(SLACK_FLOOR * churn, min(slack, room))
    return {**margins, "allocator_slack": slack}


def _cpu_work(arch: Arch, strategy: str, s: Setup, upcast: bool) -> dict:
    """CPU processes, calibrated against measured resident size (bench/plan_vs_measured.py), allocator
    slack included."""
    tokens = s.micro_batch * s.seq_len
    saved_f = FUSED_SAVED[True][1] / 4 if s.fused_ops else 0.0  # fp32 throughout, as with the upcast
    per_layer = tokens * 4 * (ACT_HIDDEN * arch.hidden + (ACT_INTER - saved_f) * arch.intermediate)
    recomputed, kept = _checkpointed(arch, s)
    # A recomputed layer in backward: its activations and their gradients, about two layers' worth
    # (one under-counted the 100m checkpointed run by 10-14% of its RSS: 1.63 vs 1.81-1.89 GB).
    acts = recomputed * tokens * arch.hidden * 4 + kept * per_layer
    acts += _layer_work(s, recomputed, kept, 2 * per_layer, per_layer, 1.0)
    biggest = max(i * o for i, o in arch.linears().values())
    packed, qstate = _quant_bytes(arch, s, 4)
    return {
        "activations": acts,
        "logits": _loss_tokens(s, strategy) * arch.vocab * LOGIT_BYTES,
        "dequant_buffers": 2 * biggest * 4 if s.quant != "none" else 0.0,
        "gathered_layers": 2 * (packed + qstate) / arch.layers if strategy in SHARD_PARAMS else 0.0,
    }


def largest_micro_batch(arch: Arch, strategy: str, s: Setup, gpu_gb: float, limit: int = 4096) -> int:
    """The largest micro batch whose estimate fits gpu_gb (0 when even 1 does not)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(arch, strategy, replace(s, micro_batch=mid)).device_total <= gpu_gb:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_all(arch: Arch, s: Setup, gpu_gb: float, cpu_gb: float, strategies=STRATEGIES) -> list[Plan]:
    plans = []
    s = replace(s, gpu_memory_gb=gpu_gb if s.gpu else None)
    for strategy in strategies:
        if strategy == "single" and s.world > 1 or strategy == "ddp" and s.world == 1:
            continue  # single is one process; ddp of one process is single
        if strategy.startswith("fsdp") and not s.gpu:
            continue  # accelerate refuses FSDP on CPU
        p = estimate(arch, strategy, s)
        p.fits = p.device_total <= gpu_gb and p.host_total <= cpu_gb
        p.max_micro_batch = largest_micro_batch(arch, strategy, s, gpu_gb)
        if p.host_total > cpu_gb:
            p.why = f"needs {p.host_total:.1f} GB of CPU RAM per node (have {cpu_gb:g})"
        elif p.device_total > gpu_gb:
            p.why = f"needs {p.device_total:.1f} GB per GPU (have {gpu_gb:g})"
        plans.append(p)
    return plans


def recommend(plans: list[Plan]) -> tuple[Plan | None, str]:
    """The first fitting plan in order of least communication, and why."""
    fitting = {p.strategy: p for p in plans if p.fits}
    for name in PREFERENCE:
        if name in fitting:
            p = fitting[name]
            reasons = {
                "single": "one process holds everything",
                "ddp": "a full 4-bit replica fits each GPU, and DDP only all-reduces the small LoRA gradients",
                "zero2": "replicas fit once gradients and optimizer state are split over the ranks",
                "fsdp": "the model fits only when its parameters are split over the GPUs",
                "zero3": "the model fits only when its parameters are split over the GPUs",
                "fsdp_offload": "even split over the GPUs it does not fit; parameters and optimizer state go to "
                "CPU RAM",
                "zero3_offload": "even split over the GPUs it does not fit; parameters and optimizer state go to "
                "CPU RAM",
            }
            return p, (f"{name}: {reasons[name]} ({_at_this_batch(p)}; up to micro batch {p.max_micro_batch})")
    if not plans:
        return None, "no strategy applies"
    closest = min(plans, key=lambda p: p.device_total)
    return None, (
        f"nothing fits: the smallest is {closest.strategy} at {closest.device_total:.1f} GB per GPU; "
        "add GPUs, lower train.micro_batch_size or data.max_seq_len, or enable gradient checkpointing"
    )


def as_planned(s: Setup, p: Plan) -> Setup:
    """The setup as the plan settled it (layers kept, loss chunk, budget): what the step's time depends on."""
    return replace(s, kept_layers=p.kept_layers, chunked_loss=p.chunked_loss, memory_budget_gb=p.memory_budget_gb)


def auto_strategy(plans: list[Plan]) -> str:
    """What `dist.strategy: auto` runs: the recommended plan, else the smallest (it will say it does not fit)."""
    best, _ = recommend(plans)
    return best.strategy if best else min(plans, key=lambda p: p.device_total).strategy


def _at_this_batch(p: Plan) -> str:
    if "cuda_context" not in p.device:  # a CPU process
        return f"{p.device_total:.1f} GB per process at this micro batch"
    return (
        f"{p.allocated:.1f} GB of tensors per GPU at this micro batch, {p.device_total:.1f} GB with the "
        "allocator's cache, CUDA context and NCCL"
    )


def arch_for_recipe(recipe: Recipe, preset: str | None = None) -> Arch:
    """A preset by name, a hub name that maps onto one, or the model's config.json."""

    name = preset or HUB.get(recipe.model.name) or (recipe.model.name if recipe.model.name in PRESETS else None)
    if name:
        if name not in PRESETS:
            raise UserError(f"--model: unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[name]
    source = resolve_source(recipe.model)
    return Arch.from_config(model_config(source, recipe.model.trust_remote_code), recipe.model.name)


def setup_for_recipe(
    recipe: Recipe, gpus_per_node: int, nodes: int, gpu: bool, gpu_memory_gb: float | None = None
) -> Setup:
    t, q = recipe.train, recipe.quant
    return Setup(
        micro_batch=t.micro_batch_size,
        seq_len=recipe.data.max_seq_len,
        lora_r=recipe.peft.r,
        targets=recipe.peft.target_modules,
        optimizer=t.optimizer,
        gradient_checkpointing=t.gradient_checkpointing,
        checkpoint_every=t.checkpoint_every,
        memory_budget_gb=t.memory_budget_gb,
        chunked_loss=t.chunked_loss,
        quant=q.mode,
        double_quant=q.double_quant,
        gpu=gpu,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        fsdp_version=recipe.dist.fsdp_version,
        fused_ops=t.fused_ops,
        gpu_memory_gb=gpu_memory_gb if gpu else None,
    )
