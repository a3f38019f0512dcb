"""The launcher's vocabularies, each written once: strategies, optimizers, dtypes and GPUs.

The recipe's allowed values, the placement rules, the memory planner and the generated configs
all read these tables (a leaf module: it imports nothing).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    name: str
    zero_stage: int = 0  # DeepSpeed ZeRO stage; 0 when not DeepSpeed
    fsdp: bool = False
    offload: bool = False  # parameters and optimizer state on the CPU

    @property
    def shards_params(self) -> bool:
        """Parameters split over the ranks (ZeRO-3, FSDP): no device_map, no k-bit upcast."""
        return self.fsdp or self.zero_stage == 3

    @property
    def shards_states(self) -> bool:
        """Gradients and optimizer state split over the ranks (ZeRO-2 and up, FSDP)."""
        return self.fsdp or self.zero_stage >= 2


STRATEGIES = {
    s.name: s
    for s in (
        Strategy("single"),
        Strategy("ddp"),
        Strategy("zero2", zero_stage=2),
        Strategy("zero3", zero_stage=3),
        Strategy("zero3_offload", zero_stage=3, offload=True),
        Strategy("fsdp", fsdp=True),
        Strategy("fsdp_offload", fsdp=True, offload=True),
    )
}
ZERO_STAGE = {s.name: s.zero_stage for s in STRATEGIES.values() if s.zero_stage}
FSDP = tuple(s.name for s in STRATEGIES.values() if s.fsdp)
SHARDED = tuple(s.name for s in STRATEGIES.values() if s.shards_params)
OFFLOAD = tuple(s.name for s in STRATEGIES.values() if s.offload)


@dataclass(frozen=True)
class Optimizer:
    name: str
    bnb_class: str | None  # bitsandbytes optimizer class; None for torch's AdamW
    state_bytes: int  # optimizer state per trainable parameter (AdamW: two fp32 moments; 8-bit: two bytes)


OPTIMIZERS = {
    o.name: o
    for o in (
        Optimizer("paged_adamw_8bit", "PagedAdamW8bit", 2),
        Optimizer("paged_adamw_32bit", "PagedAdamW32bit", 8),
        Optimizer("paged_lion_8bit", "PagedLion8bit", 1),
        Optimizer("adamw_8bit", "AdamW8bit", 2),
        Optimizer("adamw_torch", None, 8),
    )
}
BNB_OPTIMIZERS = tuple(o.name for o in OPTIMIZERS.values() if o.bnb_class)


def bnb_optimizer_refused(strategy: str, optimizer: str, fsdp_version: int = 2) -> str | None:
    """Why a bitsandbytes optimizer cannot run under this strategy (torch AdamW runs instead), or None.
    Checked on bitsandbytes 0.50.2: its state cannot live on the CPU, and its update kernels have no
    sharding rule for FSDP2's DTensor parameters ("optimizer_update_32bit does not have a sharding
    strategy registered")."""
    if optimizer not in BNB_OPTIMIZERS:
        return None
    if STRATEGIES[strategy].offload:
        return f"its state cannot live on the CPU under {strategy}"
    if STRATEGIES[strategy].fsdp and fsdp_version == 2:
        return "its kernels cannot update FSDP2's sharded (DTensor) parameters"
    return None


# dtypes by the names recipes use (torch's own names); torch.<name> is the dtype. Storage of packed
# 4-bit weights may also be uint8.
FLOAT_DTYPES = ("bfloat16", "float16", "float32")
STORAGE_DTYPES = ("uint8", *FLOAT_DTYPES)


@dataclass(frozen=True)
class Gpu:
    """What a plan's time depends on: the dense bf16 matmul peak (fp32 accumulate, as torch runs it;
    GeForce cards run that at half their fp16-accumulate rate), memory bandwidth (the step's
    elementwise work and 4-bit dequantization are bound by it), the memory torch reports, and the
    bandwidths a rank sees for collectives within a node and for host-to-device copies (GB/s, one
    direction). Datasheet figures, except `matmul_eff`: the fraction of the peak a QLoRA step's
    matmuls reach, calibrated on published runs (docs/memory.md, "Time": Ampere and Ada 0.65 from 27
    runs; Hopper 0.40 from one H100 run). The bandwidths are typical; `launcher plan` takes
    --link-gbs and --network-gbs for a machine that differs."""

    name: str
    tflops: float
    hbm_gbs: float
    memory_gib: float
    link_gbs: float  # NVLink, or PCIe (through the host where P2P is off)
    host_gbs: float  # PCIe host to device
    matmul_eff: float = 0.65


GPUS = {
    g.name: g
    for g in (
        Gpu("h200", 989.0, 4800.0, 139.8, 450.0, 50.0, 0.40),
        Gpu("h100", 989.0, 3350.0, 79.1, 450.0, 50.0, 0.40),
        Gpu("h100-pcie", 756.0, 2000.0, 79.1, 50.0, 50.0, 0.40),
        Gpu("a100", 312.0, 2039.0, 79.1, 300.0, 25.0),
        Gpu("a100-40gb", 312.0, 1555.0, 39.4, 300.0, 25.0),
        Gpu("l40s", 362.0, 864.0, 44.4, 25.0, 25.0),
        Gpu("a6000-ada", 364.0, 960.0, 47.5, 25.0, 25.0),
        Gpu("a6000", 155.0, 768.0, 47.5, 25.0, 25.0),
        Gpu("a5000", 111.0, 768.0, 23.7, 25.0, 25.0),
        Gpu("rtx-4090", 165.0, 1008.0, 23.6, 20.0, 20.0),
        Gpu("rtx-3090", 71.0, 936.0, 23.7, 10.0, 12.0),
    )
}
