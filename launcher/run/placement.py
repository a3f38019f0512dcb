"""Placement: which strategy runs, where each rank loads the model, and what is refused.

One resolver so `device_map`, quant storage dtype and k-bit upcasting are right by
construction: `auto` for one process, the rank's own device for DDP and ZeRO-2, none
under ZeRO-3 and FSDP (they place the weights themselves). Every impossible or
known-broken combination is refused here, before any weight is loaded.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from launcher.config.errors import UserError, count, listing
from launcher.config.recipe import Recipe
from launcher.config.tables import FSDP, OFFLOAD, SHARDED, bnb_optimizer_refused
from launcher.plan import planner
from launcher.plan.source import model_config, resolve_source

if TYPE_CHECKING:  # annotations only
    import torch
    from accelerate import Accelerator


@dataclass(frozen=True)
class Machine:
    """What the node offers: GPU count and memory (0 GPUs: a CPU machine, gloo)."""

    gpus: int
    gpu_memory_gb: float = 0.0

    @classmethod
    def detect(cls) -> "Machine":
        import torch

        if not torch.cuda.is_available():
            return cls(0)
        return cls(torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory / 2**30)


def resolve_strategy(recipe: Recipe, machine: Machine, cfg: dict | None = None) -> str:
    """`auto`: one process runs single; on GPUs the memory planner's recommendation (DDP while a
    replica fits, else ZeRO-2, FSDP, ZeRO-3, then the offloading variants)."""
    dist = recipe.dist
    if dist.strategy != "auto":
        return dist.strategy
    if dist.nproc * dist.nnodes == 1:
        return "single"
    if machine.gpus == 0 or "hidden_size" not in (cfg or {}):
        return "ddp"
    # The memory planner decides: the least communication that fits.
    arch = planner.Arch.from_config(cfg, recipe.model.name)
    setup = planner.setup_for_recipe(recipe, dist.nproc, dist.nnodes, gpu=True)
    plans = planner.plan_all(
        arch, setup, machine.gpu_memory_gb, float("inf"), strategies=[s for s in planner.STRATEGIES if s != "single"]
    )
    return planner.auto_strategy(plans)


def placement_problems(recipe: Recipe, strategy: str, machine: Machine, cfg: dict) -> list[str]:
    """Every refused combination, each naming the field to change. Needs no weights. (`single` with
    several processes is refused by the recipe's own validation, before a strategy is resolved.)"""
    problems = []
    m, q, dist = recipe.model, recipe.quant, recipe.dist
    procs = dist.nproc * dist.nnodes
    if m.device_map is not None and strategy in SHARDED:
        problems.append(
            f"model.device_map: must be unset under dist.strategy={strategy} "
            "(ZeRO-3 and FSDP place the weights themselves)"
        )
    if m.device_map == "auto" and strategy in ("ddp", "zero2") and procs > 1:
        problems.append(
            f"model.device_map: auto under {strategy} spreads one replica over the GPUs and silently "
            "collapses training to one process; unset it so each rank loads onto its own GPU"
        )
    # Processes sharing this machine's GPUs: LOCAL_WORLD_SIZE inside a launch (1 when Slurm binds
    # one GPU per task), else the recipe's per-node count.
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", dist.nproc))
    if machine.gpus and local_procs > machine.gpus:
        problems.append(f"dist.nproc: {local_procs} processes per node but this node has {machine.gpus} GPU(s)")
    if strategy in FSDP and machine.gpus == 0:
        problems.append(
            f"dist.strategy: {strategy} needs GPUs (accelerate refuses FSDP on CPU); on CPU use ddp, zero2 or zero3"
        )
    if strategy in SHARDED:
        method = (cfg.get("quantization_config") or {}).get("quant_method")
        if method in ("gptq", "awq", "aqlm", "hqq", "eetq"):
            problems.append(
                f"model.name: pre-quantized {method.upper()} weights cannot be sharded under "
                f"{strategy}; use ddp/zero2, or a 16-bit checkpoint with quant.mode=nf4"
            )
        if q.mode == "int8":
            problems.append(f"quant.mode: int8 weights cannot be sharded under {strategy}; use nf4, or ddp/zero2")
        if q.storage_dtype == "uint8" and q.mode in ("nf4", "fp4"):
            problems.append(
                f"quant.storage_dtype: uint8 4-bit weights cannot be flattened/sharded under {strategy}; "
                "set it to auto (the parameter dtype)"
            )
        elif q.storage_dtype not in ("auto", "uint8") and m.dtype != "auto" and q.storage_dtype != m.dtype:
            problems.append(
                f"quant.storage_dtype: {q.storage_dtype} must equal model.dtype ({m.dtype}) under "
                f"{strategy}, or the packed weights are cast and corrupted"
            )
    if strategy in FSDP and recipe.peft.method not in ("lora", "ia3"):
        problems.append(f"peft.method: {recipe.peft.method} is not supported under {strategy}; use lora (or ia3)")
    if recipe.train.chunked_loss not in (0, "auto") and strategy in SHARDED:
        problems.append(
            f"train.chunked_loss: not under {strategy} yet (the output head's weights are gathered only inside "
            "its own forward there); set it to 0, or use single, ddp or zero2"
        )
    if recipe.train.compile and strategy not in ("single", "ddp"):
        problems.append(f"train.compile: not under {strategy} yet (run with single and ddp); set it to false")
    budget = recipe.train.memory_budget_gb
    if isinstance(budget, float) and machine.gpus and machine.gpu_memory_gb and budget > machine.gpu_memory_gb:
        problems.append(
            f"train.memory_budget_gb: {budget:g} GB is more than this GPU's {machine.gpu_memory_gb:.1f} GB; "
            "set it at most to that (less what else runs on the GPU)"
        )
    return problems


def check(recipe: Recipe, machine: Machine, cfg: dict) -> str:
    """Resolve the strategy and raise one UserError listing every placement problem."""
    strategy = resolve_strategy(recipe, machine, cfg)
    refuse_problems(recipe, strategy, machine, cfg)
    return strategy


def refuse_problems(recipe: Recipe, strategy: str, machine: Machine, cfg: dict) -> None:
    """One UserError listing every placement problem of this strategy, if it has any."""
    problems = placement_problems(recipe, strategy, machine, cfg)
    if problems:
        raise listing(f"{count(len(problems), 'placement problem')} (strategy {strategy})", problems)


def optimizer_for(strategy: str, optimizer: str, fsdp_version: int = 2) -> str:
    """Substitute torch AdamW where a bitsandbytes optimizer cannot run (tables.bnb_optimizer_refused)."""
    why = bnb_optimizer_refused(strategy, optimizer, fsdp_version)
    if why:
        warnings.warn(f"train.optimizer: {optimizer} replaced by adamw_torch: {why}", stacklevel=2)
        return "adamw_torch"
    return optimizer


def launched_strategy(accelerator: Accelerator) -> str | None:
    """What accelerate was launched with: deepspeed stage, fsdp, ddp, or None for one process."""
    kind = accelerator.distributed_type.value
    if kind == "DEEPSPEED":
        plugin = accelerator.state.deepspeed_plugin
        offload = plugin.deepspeed_config.get("zero_optimization", {}).get("offload_param", {}).get("device", "none")
        stage = plugin.zero_stage
        return "zero2" if stage <= 2 else ("zero3_offload" if offload not in (None, "none") else "zero3")
    if kind == "FSDP":
        return "fsdp_offload" if fsdp_offloads(accelerator.state.fsdp_plugin) else "fsdp"
    if kind.startswith("MULTI_"):
        return "ddp"
    return None


def fsdp_offloads(plugin) -> bool:
    """FSDP1 gives CPUOffload(offload_params=...), FSDP2 an OffloadPolicy that is truthy either way."""
    off = plugin.cpu_offload
    return bool(getattr(off, "offload_params", False)) or type(off).__name__ == "CPUOffloadPolicy"


def check_launch(strategy: str, accelerator: Accelerator, world: int) -> None:
    """The recipe's strategy must be what accelerate was actually launched with."""
    launched = launched_strategy(accelerator)
    if world > 1 and launched is None:
        raise UserError(
            f"{world} processes were launched but accelerate sees one, so gradients would not sync; "
            "on a CPU machine set ACCELERATE_USE_CPU=true, or launch with `launcher train`"
        )
    if launched == strategy or (launched is None and strategy in ("single", "ddp") and world == 1):
        return
    how = f"--config_file accelerate_configs/{strategy}.yaml" if strategy != "single" else "with no config"
    raise UserError(
        f"dist.strategy: the recipe says {strategy} but this process was launched as "
        f"{launched or 'a single process'}; use `launcher train`, or `accelerate launch {how}` "
        "(`launcher configs` writes it)"
    )


def check_checkpointing(fsdp_activation_checkpointing: bool, gradient_checkpointing: bool) -> None:
    """Both FSDP's activation checkpointing and transformers' gradient checkpointing would wrap the
    same layers twice, which fails in backward; the generated configs leave FSDP's off."""
    if fsdp_activation_checkpointing and gradient_checkpointing:
        raise UserError(
            "train.gradient_checkpointing: the accelerate config also sets fsdp_activation_checkpointing; "
            "use one: set train.gradient_checkpointing=false or fsdp_activation_checkpointing: false"
        )


def for_target(recipe: Recipe, device: str | None = None, need_model: bool = True) -> tuple[str, bool]:
    """(strategy, gpu) for this recipe on this machine (or on a GPU node when device == "gpu")."""
    machine = Machine.detect()
    if device == "gpu" and machine.gpus == 0:  # writing configs for a GPU node from a login node
        machine = Machine(gpus=recipe.dist.nproc, gpu_memory_gb=80.0)
    elif device == "cpu":
        machine = Machine(0)
    try:
        cfg = model_config(resolve_source(recipe.model), recipe.model.trust_remote_code, local_only=not need_model)
    except UserError:
        if need_model:
            raise
        cfg = {}  # configs can be written for a model this machine cannot see
    return check(recipe, machine, cfg), machine.gpus > 0


def launched_with_deepspeed() -> bool:
    """Whether `accelerate launch` started this process with a DeepSpeed config: the one fact about the
    launch that must be known before the Accelerator exists (it then owns mixed precision)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


@dataclass(frozen=True)
class Placement:
    """The strategy as decided once for this process, from the recipe, the machine and how the
    process was launched. Loading, prepare, checkpointing and saving the adapter read it; nothing
    downstream works the strategy out again."""

    strategy: str
    rank: int
    world: int
    zero_stage: int  # DeepSpeed ZeRO stage; 0 when not DeepSpeed
    fsdp_version: int  # 1 or 2 under FSDP; 0 otherwise
    offload: bool  # parameters (and optimizer state) live on the CPU
    rank0_reads: bool  # only rank 0 reads the weights (FSDP2 RAM-efficient loading, ZeRO-3 with several ranks)
    device_map: object  # for from_pretrained; None where ZeRO-3/FSDP place the weights
    param_dtype: object  # torch dtype of the unquantized weights
    storage_dtype: object  # torch dtype holding the packed 4-bit weights
    kbit_upcast: bool  # prepare_model_for_kbit_training's fp32 upcast
    optimizer: str  # the optimizer actually used (bitsandbytes ones are replaced where they cannot run)
    kept_layers: int = 0  # decoder layers (the last) keeping their activations: train.memory_budget_gb's choice
    chunked_loss: int = 0  # tokens a chunk of the loss (0: whole): train.chunked_loss, auto decided
    memory_budget_gb: float | None = None  # train.memory_budget_gb, auto decided

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage > 0

    @property
    def fsdp1(self) -> bool:
        """FSDP1: accelerate wraps the model in prepare(), and the optimizer is built after it."""
        return self.fsdp_version == 1

    @property
    def zero3(self) -> bool:
        """ZeRO-3: parameters are partitioned, so the adapter is gathered to be saved."""
        return self.zero_stage == 3

    @property
    def shards_before_optimizer(self) -> bool:
        """FSDP wraps here, before the optimizer sees the parameters (FSDP2 rank-0 reads wrapped at load)."""
        return self.fsdp_version > 0 and not self.fsdp2_rank0_reads

    @property
    def zero3_rank0_reads(self) -> bool:
        return self.rank0_reads and self.zero3

    @property
    def fsdp2_rank0_reads(self) -> bool:
        return self.rank0_reads and self.fsdp_version == 2


def resolve(recipe: Recipe, accelerator: Accelerator, cfg: dict, machine: Machine | None = None) -> Placement:
    """Check the recipe against this machine and this launch (one UserError listing every problem)
    and decide everything that depends on the strategy."""
    from launcher.run.model import DTYPES, compute_dtype  # torch: not imported by commands that only check recipes

    rank, world = rank_and_world()
    machine = machine or Machine.detect()
    strategy = check(recipe, machine, cfg)
    check_launch(strategy, accelerator, world)
    kind = accelerator.distributed_type.value
    fsdp = accelerator.state.fsdp_plugin if kind == "FSDP" else None
    if fsdp is not None:
        check_checkpointing(bool(fsdp.activation_checkpointing), recipe.train.gradient_checkpointing)
    zero_stage = accelerator.state.deepspeed_plugin.zero_stage if kind == "DEEPSPEED" else 0
    fsdp_version = (2 if accelerator.is_fsdp2 else 1) if fsdp is not None else 0
    rank0_reads = world > 1 and ((fsdp_version == 2 and bool(fsdp.cpu_ram_efficient_loading)) or zero_stage == 3)
    dtype = recipe.model.dtype
    param_dtype = compute_dtype(recipe.quant) if dtype == "auto" else DTYPES[dtype]
    return Placement(
        strategy=strategy,
        rank=rank,
        world=world,
        zero_stage=zero_stage,
        fsdp_version=fsdp_version,
        offload=fsdp_offloads(fsdp) if fsdp is not None else strategy in OFFLOAD,
        rank0_reads=rank0_reads,
        device_map=device_map_for(strategy, recipe.model.device_map, accelerator.device),
        param_dtype=param_dtype,
        storage_dtype=storage_dtype(recipe, strategy, param_dtype),
        kbit_upcast=kbit_upcast(strategy),
        optimizer=optimizer_for(strategy, recipe.train.optimizer, recipe.dist.fsdp_version),
        **memory_choices(recipe, strategy, cfg, machine),
    )


def memory_choices(recipe: Recipe, strategy: str, cfg: dict, machine: Machine) -> dict:
    """What the memory planner decides for this run (planner.resolve): how many of the last decoder layers
    keep their activations within train.memory_budget_gb, and the chunked loss's tokens a chunk, with
    `auto` settled for this machine (a user's own value is taken as it is)."""
    t = recipe.train
    explicit = {"kept_layers": 0, "chunked_loss": t.chunked_loss if t.chunked_loss != "auto" else 0}
    explicit["memory_budget_gb"] = t.memory_budget_gb if t.memory_budget_gb != "auto" else None
    if "hidden_size" not in cfg or (t.memory_budget_gb is None and t.chunked_loss != "auto"):
        return explicit
    arch = planner.Arch.from_config(cfg, recipe.model.name)
    gpu = machine.gpus > 0
    setup = planner.setup_for_recipe(recipe, recipe.dist.nproc, recipe.dist.nnodes, gpu, machine.gpu_memory_gb)
    plan = planner.estimate(arch, strategy, setup)
    return {
        "kept_layers": plan.kept_layers,
        "chunked_loss": plan.chunked_loss,
        "memory_budget_gb": plan.memory_budget_gb,
    }


def rank_and_world() -> tuple[int, int]:
    """Global rank and world size from torch.distributed (accelerate under DeepSpeed on CPU misreports them)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def device_map_for(strategy: str, override, device: torch.device):
    """The `device_map` for from_pretrained under this strategy on this rank's device."""
    if strategy in SHARDED:
        return None  # ZeRO-3/FSDP place weights themselves; a device_map breaks them
    if override is not None:
        return override
    if device.type == "cpu":
        return None  # CPU is from_pretrained's default placement
    if strategy == "single":
        return "auto"  # may spread a big model over the local GPUs (one busy at a time)
    return {"": device}  # DDP/ZeRO-2: a full replica on this rank's own GPU


def kbit_upcast(strategy: str) -> bool:
    """prepare_model_for_kbit_training's fp32 upcast mixes dtypes, which breaks flattening under sharding."""
    return strategy not in SHARDED


def storage_dtype(recipe: Recipe, strategy: str, param_dtype):
    """Packed 4-bit container dtype: uint8 normally; the parameter dtype when ZeRO-3/FSDP shard it."""
    from launcher.run.model import DTYPES  # torch: not imported by commands that only check recipes

    if recipe.quant.storage_dtype != "auto":
        return DTYPES[recipe.quant.storage_dtype]
    return param_dtype if strategy in SHARDED else DTYPES["uint8"]
