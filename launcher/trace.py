"""Tracing the launcher's own training step at full size without a GPU: `launcher plan --trace`.

The recipe's model is built at its real size on fake tensors (shapes, dtypes and devices, no
storage), its linear layers quantized by bitsandbytes' own quantize_4bit into the packed 4-bit
layout with its quantization state, wrapped with the recipe's adapter by `model.apply_peft`,
sharded the way the strategy shards it over a fake process group of the planned world size, and
then `loop.train_step` runs two steps (the second with optimizer state) at the recipe's micro
batch and sequence length while `memtrack.Tracker` counts every tensor by category.

What runs is the launcher's and the libraries' real code. Four things are substituted, each for
a reason checked here (torch 2.13 CPU build, bitsandbytes 0.50):
- fake tensors live on the CPU device: autograd aborts on fake "cuda" tensors in a CPU-only torch
  ("not linked with support for cuda devices"). The GPU's dtypes (bf16) are used; what would sit
  on the GPU is what the strategy keeps on the device, and under offloading the parameters,
  gradients and optimizer state are counted on the host.
- a 4-bit weight is a plain parameter carrying bitsandbytes' attributes and quantization state:
  `Params4bit` cannot wrap a fake tensor ("the raw Tensor object is already associated to a python
  object of type FakeTensor"). The bytes are the same packed tensor and state; bitsandbytes'
  Linear4bit and matmul_4bit run unchanged (tests/test_trace.py checks the peak against real
  Params4bit layers, byte for byte).
- bitsandbytes' fused gemm_4bit is counted as its CUDA fallback and CPU kernel run it: the weight
  dequantized, then one matmul (the tracker expands it; a fake kernel shows only the output).
- MoE experts in fp32 (k-bit training upcasts them) take transformers' grouped-matmul fallback:
  torch's grouped_mm has a fake kernel for bf16 inputs only.

What the trace cannot see, and the planner adds as its own terms: the layer gathered ahead
(prefetch), the caching allocator's slack, the CUDA context, NCCL's buffers (planner._gpu_margins),
and the host side of a GPU process (libraries, pinned staging, the loading buffers).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from launcher.config.errors import UserError
from launcher.config.recipe import Recipe
from launcher.config.tables import FSDP, OFFLOAD
from launcher.plan import memtrack, random_model
from launcher.plan.planner import Totals
from launcher.plan.source import model_config
from launcher.run import attention, loop, placement
from launcher.run.checkpoint import Progress
from launcher.run.context import RunContext

TRACEABLE = ("single", "ddp", "fsdp", "fsdp_offload")
NOT_TRACED = {
    "zero2": "DeepSpeed's engine needs its accelerator's real kernels and streams",
    "zero3": "DeepSpeed's engine needs its accelerator's real kernels and streams",
    "zero3_offload": "DeepSpeed's engine needs its accelerator's real kernels and streams",
}
STEPS = 2  # the second step runs with optimizer state, as every later one does
GB = 2**30


@dataclass
class Traced(Totals):
    """Per-rank peaks of one traced step (GB): what made up the device's peak, and the host's."""

    strategy: str
    world: int
    device: dict = field(default_factory=dict)
    host: dict = field(default_factory=dict)
    seconds: float = 0.0


class _Steps:
    """What `loop.train_step` asks of accelerate, for a step with no gradient accumulation."""

    sync_gradients = True

    def __init__(self, device):
        self.device = device

    def accumulate(self, model: torch.nn.Module):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(list(params), max_norm)


def placement_for(
    recipe: Recipe, strategy: str, world: int, gpu: bool, choices: dict | None = None
) -> placement.Placement:
    """The placement a run of this strategy would decide on a GPU (bf16) or CPU (fp32) machine, for
    rank 0 of `world` (every rank reads: the trace counts the step, not the load)."""
    from launcher.run.model import DTYPES

    m, q = recipe.model, recipe.quant
    if m.dtype != "auto":
        param = DTYPES[m.dtype]
    elif q.compute_dtype != "auto":
        param = DTYPES[q.compute_dtype]
    else:  # what model.compute_dtype picks on each machine
        param = torch.bfloat16 if gpu else torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = placement.optimizer_for(strategy, recipe.train.optimizer, recipe.dist.fsdp_version)
    return placement.Placement(
        strategy=strategy,
        rank=0,
        world=world,
        zero_stage=0,  # DeepSpeed is not traced
        fsdp_version=2 if strategy in FSDP else 0,
        offload=strategy in OFFLOAD,
        rank0_reads=False,
        device_map=None,
        param_dtype=param,
        storage_dtype=placement.storage_dtype(recipe, strategy, param),
        kbit_upcast=placement.kbit_upcast(strategy),
        optimizer=opt,
        **(choices or {}),
    )


# ---------------------------------------------------------------- the model on fake tensors


@contextlib.contextmanager
def fake_torch():
    """A FakeTensorMode, and the few things that must differ while it is used (see the module docstring)."""
    import bitsandbytes.functional as bf
    from bitsandbytes.nn import modules as bnb_modules
    from torch._subclasses.fake_tensor import FakeTensorMode

    if "dynamic" not in bf.name2qmap:  # built from Python lists: must exist before the mode
        bf.name2qmap["dynamic"] = bf.create_dynamic_map()
    from transformers.integrations import moe

    saved_apply, saved_fix = torch.nn.Module._apply, bnb_modules.fix_4bit_weight_quant_state_from_module
    saved_grouped = moe._can_use_grouped_mm
    torch.nn.Module._apply = _replacing_apply
    bnb_modules.fix_4bit_weight_quant_state_from_module = _carry_quant_state
    # MoE experts upcast to fp32 (k-bit training): torch's grouped_mm has a fake (meta) kernel for bf16
    # only, so fp32 experts take transformers' own grouped fallback, whose outputs are the same tensors.
    moe._can_use_grouped_mm = lambda x, w, offs: w.dtype == torch.bfloat16 and saved_grouped(x, w, offs)
    try:
        yield FakeTensorMode(allow_non_fake_inputs=True)  # entered where tensors are made
    finally:
        torch.nn.Module._apply = saved_apply
        bnb_modules.fix_4bit_weight_quant_state_from_module = saved_fix
        moe._can_use_grouped_mm = saved_grouped


def _replacing_apply(self, fn, recurse=True):
    """Module.to() for fake parameters: torch swaps them in place, which fake tensors refuse (weak
    references); replacing the parameter frees the old one just the same."""
    if recurse:
        for child in self.children():
            child._apply(fn)
    for key, p in self._parameters.items():
        if p is not None:
            with torch.no_grad():
                new = fn(p)
            if new is not p:
                self._parameters[key] = torch.nn.Parameter(new, requires_grad=p.requires_grad)
    for key, b in self._buffers.items():
        if b is not None:
            self._buffers[key] = fn(b)
    return self


def _carry_quant_state(module) -> None:
    """bitsandbytes re-wraps the weight FSDP gathers as a Params4bit; here the state rides along."""
    if getattr(module.weight, "quant_state", None) is None:
        module.weight.quant_state = module.quant_state


def stand_in(attn: str) -> str:
    """The attention the trace runs for `attn`: flash-attention where it is installed; where it is not
    (a login node, a laptop: where people plan), SDPA's fused kernel, the same memory class (no
    sequence x sequence scores are kept). Planning must not need the kernels it plans for."""
    import importlib.util

    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return "sdpa"
    return attn


def fake_model(source: str, recipe: Recipe, d: placement.Placement, mode):
    """The model of `source` at full size on fake tensors, 4-bit layers packed by bitsandbytes."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import quantize_4bit

    from launcher.run.model import quantization_config

    qc = quantization_config(recipe.quant, d.storage_dtype)
    if qc is not None:
        qc.bnb_4bit_compute_dtype = d.param_dtype if recipe.quant.compute_dtype == "auto" else qc.bnb_4bit_compute_dtype
    explicit = "attn_implementation" in recipe.model.model_fields_set
    attn = attention.choose(stand_in(recipe.model.attn_implementation), explicit, model_config(source))
    skeleton = random_model.build(source, qc, d.param_dtype, "meta", attn)
    with mode:
        for module in skeleton.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if isinstance(p, bnb.nn.Int8Params):
                    new = _fake_int8(p, d.param_dtype)
                elif isinstance(p, bnb.nn.Params4bit):
                    w = torch.empty(p.shape, dtype=d.param_dtype)
                    packed, state = quantize_4bit(
                        w,
                        blocksize=p.blocksize,
                        compress_statistics=p.compress_statistics,
                        quant_type=p.quant_type,
                        quant_storage=p.quant_storage,
                    )
                    new = torch.nn.Parameter(packed, requires_grad=False)
                    for attr in ("blocksize", "compress_statistics", "quant_type", "quant_storage"):
                        setattr(new, attr, getattr(p, attr))
                    new.bnb_quantized, new.quant_state, module.quant_state = True, state, state
                else:
                    new = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
                del module._parameters[name]
                setattr(module, name, new)
            for name, b in list(module.named_buffers(recurse=False)):
                module._buffers[name] = mode.from_tensor(b)
    return skeleton


def _fake_int8(p, dtype: torch.dtype) -> torch.nn.Parameter:
    """An LLM.int8() weight as Int8Params leaves it on a GPU: int8 codes with their per-row fp32 scales
    (CB, SCB), quantized by bitsandbytes' own int8_vectorwise_quant; Linear8bitLt moves them into its
    matmul state on the first forward."""
    from bitsandbytes.functional import int8_vectorwise_quant

    cb, scb, _ = int8_vectorwise_quant(torch.empty(p.shape, dtype=torch.float16 if dtype == torch.float32 else dtype))
    new = torch.nn.Parameter(cb, requires_grad=False)
    new.CB, new.SCB, new.has_fp16_weights = cb, scb, False
    return new


def real_model(source: str, recipe: Recipe, d: placement.Placement):
    """The same model really loaded (random weights), for checking the trace against a real step."""
    from launcher.run.model import load_base_model

    return load_base_model(source, recipe.model, recipe.quant, dtype=d.param_dtype, storage=d.storage_dtype)


# ---------------------------------------------------------------- one traced run


@contextlib.contextmanager
def fake_group(world: int):
    """A process group of `world` ranks in which this process is rank 0 and collectives do nothing."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group already exists")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard(model: torch.nn.Module, strategy: str, mesh=None):
    """Shard the model the way the strategy's run does (launcher.run.sharding's FSDP2). A DDP rank runs the
    single-process step: DDP's C++ reducer cannot run on fake tensors, and its one addition, the
    buckets, is counted by `run_steps`."""
    if strategy in FSDP:
        from launcher.run import sharding

        return sharding.fsdp2_shard(model, offload=strategy == "fsdp_offload", mesh=mesh, pin=False)
    return model


def _mesh(world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))  # outside the fake mode: the mesh reads its ranks back


def batch(recipe: Recipe, vocab: int) -> dict:
    """A full micro batch: every row one sample of max_seq_len tokens, so attention is causal with no
    mask. The position ids are given (real tensors, like the batch): transformers reads them to decide
    whether rows are packed, and a decision read from fake tensors would build a mask no GPU run builds."""
    g = torch.Generator().manual_seed(0)
    mb, seq = recipe.train.micro_batch_size, recipe.data.max_seq_len
    ids = torch.randint(0, vocab, (mb, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(seq).expand(mb, seq).contiguous()}


def run_steps(
    recipe: Recipe,
    model: torch.nn.Module,
    d: placement.Placement,
    tracker: memtrack.Tracker,
    *,
    ddp: bool = False,
    mode=contextlib.nullcontext(),
) -> dict:
    """STEPS of `loop.train_step` under the tracker, inside `mode` (the FakeTensorMode, or nothing when
    the step runs for real); returns its device and host peaks (GB by category)."""
    from launcher.run.optim import build_optimizer, build_scheduler

    with mode:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, recipe.train, d.optimizer)
        scheduler = build_scheduler(optimizer, recipe.train, STEPS)
    tracker.own(list(model.parameters()) + list(model.buffers()) + _quant_states(model), "parameters")
    if ddp:  # DDP's buckets: one flat copy of the trainable gradients, allocated when it wraps the model
        tracker.block(sum(p.numel() * p.element_size() for p in params), "gradients")
    hooks = [
        model.register_forward_pre_hook(lambda *_: setattr(tracker, "phase", "forward")),
        model.register_forward_hook(lambda *_: _forward_done(tracker)),
        optimizer.register_step_pre_hook(lambda *_: _stepping(tracker, params)),
        optimizer.register_step_post_hook(lambda opt, *_: tracker.own(_state_tensors(opt), "optimizer_state")),
    ]
    model.train()  # as loop.fit does: from_pretrained leaves a model in eval mode (no checkpointing, no dropout)
    vocab = _vocab(model)
    b = batch(recipe, vocab)
    # No stop request, nothing saved: train_step reads the model, optimizer, schedule and step.
    ctx = RunContext(recipe, _Steps(torch.device("cpu")), d, Path(recipe.train.output_dir), Progress(), None)
    ctx.model, ctx.optimizer, ctx.scheduler = model, optimizer, scheduler
    try:
        with mode, tracker, memtrack.fsdp_resizes(tracker):
            for step in range(STEPS):
                ctx.progress.step = step
                loop.train_step(ctx, dict(b))
    finally:
        for h in hooks:
            h.remove()
    peaks = tracker.peaks(d.offload)
    return {where: {k: v / GB for k, v in peak.by_category.items() if v} for where, peak in peaks.items()}


def _quant_states(model: torch.nn.Module) -> list:
    """The 4-bit layers' quantization states (absmax, codes, offsets): module attributes, neither
    parameters nor buffers, and not sharded by FSDP (every rank holds all of them)."""
    out = []
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        while state is not None:
            out += [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
            state = getattr(state, "state2", None)
    return out


def _forward_done(tracker):
    tracker.mark_forward_end()
    tracker.phase = "backward"


def _stepping(tracker, params):
    tracker.own([p.grad for p in params if p.grad is not None], "gradients")
    tracker.phase = "optimizer"


def _state_tensors(optimizer) -> list:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _vocab(model: torch.nn.Module) -> int:
    from launcher.run.sharding import unwrap

    return unwrap(model).config.vocab_size


def trace(
    recipe: Recipe,
    source: str,
    strategy: str,
    world: int,
    *,
    gpu: bool = True,
    real: bool = False,
    gpu_memory_gb: float = 80.0,
) -> Traced:
    """Trace STEPS training steps of the recipe's model under `strategy` on rank 0 of `world`.

    real=True runs the same step on real tensors on this CPU (the model really loaded and quantized,
    DDP really wrapping it), in the process group the caller started when world > 1: what the
    fidelity tests compare the trace with."""
    if strategy not in TRACEABLE:
        raise UserError(f"dist.strategy: {strategy} cannot be traced: {NOT_TRACED.get(strategy, 'unknown')}")
    # What a run under this strategy would refuse, the trace refuses too (as if on `world` GPUs).
    machine = placement.Machine(gpus=max(world, recipe.dist.nproc), gpu_memory_gb=gpu_memory_gb)
    placement.refuse_problems(recipe, strategy, machine, model_config(source))
    start = time.perf_counter()
    choices = placement.memory_choices(recipe, strategy, model_config(source), machine if gpu else placement.Machine(0))
    d = placement_for(recipe, strategy, world, gpu, choices)
    fsdp = strategy in FSDP
    tracker = memtrack.Tracker(fake=not real)
    group = fake_group(world) if strategy != "single" and not real else contextlib.nullcontext()
    with fake_torch() if not real else contextlib.nullcontext(contextlib.nullcontext()) as mode, group:
        mesh = _mesh(world) if fsdp else None
        base = real_model(source, recipe, d) if real else fake_model(source, recipe, d, mode)
        with mode:
            model = shard(_adapter(recipe, base, d), strategy, mesh)
        if real and strategy == "ddp":
            model = _real_ddp(model, tracker)
        peaks = run_steps(recipe, model, d, tracker, ddp=strategy == "ddp" and not real, mode=mode)
    return Traced(strategy, world, peaks["device"], peaks["host"], time.perf_counter() - start)


def _adapter(recipe: Recipe, base: torch.nn.Module, d: placement.Placement):
    from launcher.run.model import adapter_for

    model = adapter_for(recipe, base, kbit_upcast=d.kbit_upcast, total_steps=STEPS, kept_layers=d.kept_layers)
    if d.chunked_loss:
        from launcher.run import chunked_loss

        chunked_loss.install(model, d.chunked_loss)
    return model


def _real_ddp(model: torch.nn.Module, tracker: memtrack.Tracker):
    """torch's DDP, wrapped while the tracker watches, so its buckets are counted (as gradients); the
    one-off broadcast of the weights at wrap time is not part of the step and is forgotten."""
    with tracker:
        model = torch.nn.parallel.DistributedDataParallel(model)
    tracker.own_unnamed("gradients")
    tracker.rebase()
    return model


def source_for(recipe: Recipe, arch) -> str:
    """A directory with the architecture's config.json: a preset's, or the recipe's model's."""
    from launcher.plan.archs import PRESETS
    from launcher.plan.source import resolve_source

    if arch.name in PRESETS:
        return str(random_model.preset_dir(arch.name))
    return resolve_source(recipe.model)


def render(traced: list[Traced], plans: list, refused: dict | None = None, gpu: bool = True) -> str:
    """The traced peaks per category next to the planner's total for the same strategies, and the
    DeepSpeed strategies beside them from the planner alone (marked *); `refused`: strategies the
    recipe cannot run under, with the reason."""
    why = {**NOT_TRACED, **(refused or {})}
    skipped = sorted({p.strategy for p in plans} - {t.strategy for t in traced})
    tail = ["not traced: " + "; ".join(f"{s} ({why.get(s, 'cannot be traced')})" for s in skipped)] if skipped else []
    if not traced:
        return "\n".join(["traced: no planned strategy could be traced", *tail])
    planned = {p.strategy: p for p in plans}
    analytic = [s for s in skipped if s in NOT_TRACED]  # DeepSpeed: planned, shown beside the traces
    cats = [c for c in memtrack.CATEGORIES if any(c in t.device for t in traced)]
    unseen = "prefetch, allocator, CUDA context and NCCL" if gpu else "process's own memory (libraries, allocator)"
    blank = "".join(f"{'-':>15}" for _ in analytic)
    lines = [
        f"traced: {STEPS} steps of the training step on fake tensors, rank 0 (GB; the planner's terms for the "
        f"{unseen} are not in the trace; * planned only, not traced)",
        f"{'GB per ' + ('GPU' if gpu else 'process'):<22}"
        + "".join(f"{t.strategy:>14}" for t in traced)
        + "".join(f"{s + '*':>15}" for s in analytic),
    ]
    lines += [f"  {c:<20}" + "".join(f"{t.device.get(c, 0.0):>14.2f}" for t in traced) + blank for c in cats]
    lines.append(f"  {'traced peak':<20}" + "".join(f"{t.device_total:>14.2f}" for t in traced) + blank)
    lines.append(
        f"  {'planned, as traced':<20}"
        + "".join(f"{_planned_device(planned[t.strategy]):>14.2f}" for t in traced)
        + "".join(f"{_planned_device(planned[s]):>15.2f}" for s in analytic)
    )
    if any(t.host for t in traced):
        lines.append(f"{'offloaded, per rank':<22}" + "".join(f"{t.host_total:>14.2f}" for t in traced) + blank)
    lines.append(f"{'traced in (s)':<22}" + "".join(f"{t.seconds:>14.0f}" for t in traced) + blank)
    return "\n".join(lines + tail)


def _planned_device(plan) -> float:
    """The planner's figure for what a trace sees: allocated tensors less the prefetched layer (GPU), or
    the process less its libraries (CPU)."""
    return plan.traceable if "cuda_context" in plan.device else plan.device_total - plan.device["framework_overhead"]
