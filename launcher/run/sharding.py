"""Sharded models: FSDP2 wrapping of a 4-bit LoRA model, and gathering the full adapter to save.

Used by the training loop under FSDP (accelerate then finds the model already wrapped and
keeps it) and directly by tests that run torch's `fully_shard` over gloo on CPU.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from launcher.config.errors import UserError

if TYPE_CHECKING:  # annotations only
    from accelerate import Accelerator

ADAPTER_MARKERS = ("lora_", "ia3_")  # the peft methods allowed under FSDP


def decoder_layer_names(model: torch.nn.Module) -> set[str]:
    """Class names transformers marks as unsplittable: one FSDP unit each."""
    for module in model.modules():  # the transformers model inside the peft wrappers
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def fsdp2_shard(
    model: torch.nn.Module,
    *,
    offload: bool = False,
    param_dtype: torch.dtype | None = None,
    mesh=None,
    pin: bool = True,
):
    """fully_shard each decoder layer, then the root. Packed 4-bit weights must be stored in a
    floating dtype (quant.storage_dtype), or FSDP would shard raw bytes and corrupt them. `pin`:
    offloaded shards in pinned host memory (the memory trace turns it off: same bytes, no pinning there)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    bad = [n for n, p in model.named_parameters() if type(p).__name__ == "Params4bit" and not p.is_floating_point()]
    if bad:
        raise UserError(
            f"quant.storage_dtype: {len(bad)} 4-bit weights are stored as {model.get_parameter(bad[0]).dtype}; "
            "FSDP needs them in the parameter dtype (set quant.storage_dtype=auto)"
        )
    kwargs = {"mesh": mesh}
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=pin)
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype)
    names = decoder_layer_names(model)
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise UserError("model.name: found no decoder layers to shard (the model declares no _no_split_modules)")
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model


WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "FullyShardedDataParallel")


def unwrap(model: torch.nn.Module):
    """The model inside the training wrappers (DDP, DeepSpeed's engine, an FSDP1 root, torch.compile).
    Not accelerate's unwrap_model: that imports DeepSpeed whenever it is installed, which costs seconds
    and prints DeepSpeed's "Setting accelerator" line in runs that never use it."""
    while True:
        if type(model).__name__ in WRAPPERS:
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def trainable_state(
    model: torch.nn.Module, accelerator: Accelerator = None, *, fsdp1: bool = False, zero3: bool = False
) -> dict[str, torch.Tensor]:
    """Full (unsharded) trainable tensors on CPU, on every rank; collective under ZeRO-3/FSDP
    (`fsdp1`/`zero3` say which, from the run's Placement; FSDP2's DTensors speak for themselves).

    Only the adapter is gathered, never the frozen base, so saving a 70B run moves megabytes.
    """
    from torch.distributed.tensor import DTensor

    if fsdp1:
        # FSDP1 flat parameters hide the per-tensor names: gather a full state dict on rank 0
        # (offloaded to CPU; other ranks get nothing) and keep the adapter's tensors.
        full = accelerator.get_state_dict(model)
        return {k: v.detach().cpu() for k, v in full.items() if any(m in k for m in ADAPTER_MARKERS)}
    model = unwrap(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().cpu().clone() for n, p in named}
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone() for n, p in named}


def digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names and exact bytes: equal on every rank iff the replicas are identical."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- RAM-efficient loading (FSDP2, ZeRO-3)


def quant_layout(model: torch.nn.Module) -> dict:
    """Per 4-bit layer: the packed weight's shape and dtype and its quantization state, as plain CPU
    tensors (rank 0 sends this; each rank rebuilds the state on its own device)."""
    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ == "Params4bit":
            packed = {
                k: v.cpu() if torch.is_tensor(v) else v for k, v in weight.quant_state.as_dict(packed=True).items()
            }
            out[name] = (tuple(weight.shape), weight.dtype, packed)
    return out


def apply_quant_layout(skeleton, layout: dict, device: torch.device, weights_on: str = "meta") -> None:
    """Give a meta-device skeleton rank 0's packed 4-bit shapes and quantization states (the states
    on `device`, the packed weights as empty tensors on `weights_on`)."""
    from bitsandbytes.functional import QuantState
    from bitsandbytes.nn import Params4bit

    for name, (shape, dtype, packed) in layout.items():
        module = skeleton.get_submodule(name)
        state = QuantState.from_dict(packed, torch.device(device))
        module.weight = Params4bit(
            torch.empty(shape, dtype=dtype, device=weights_on),
            requires_grad=False,
            quant_state=state,
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=dtype,
            bnb_quantized=True,
        )
        module.quant_state = state  # bitsandbytes restores it onto the weight FSDP rebuilds each forward


def _rank0_reads(load, wrap, device: torch.device, weights_on: str = "meta"):
    """Rank 0 reads, quantizes and wraps the model; every other rank builds the same structure on
    the meta device (no memory) from rank 0's 4-bit layout. Returns (model, rank)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    if rank == 0:
        base = load(None)
        layout = [quant_layout(base)]  # names of the unwrapped model, as the skeleton has them
        model = wrap(base)
    else:
        model, layout = load("meta"), [None]
    dist.broadcast_object_list(layout, src=0)
    if rank != 0:
        apply_quant_layout(model, layout[0], device, weights_on)
        model = wrap(model)
    return model, rank


def load_fsdp2(load, wrap, *, offload: bool, device: torch.device) -> torch.nn.Module:
    """RAM-efficient FSDP2 model: only rank 0 reads and quantizes the weights.

    `load(device_map)` returns the quantized base (device_map "meta" for the skeleton) and
    `wrap(model)` adds the adapter. Every rank but 0 shards the skeleton, allocates only its own
    shards, and receives them from rank 0. Peak host memory: one full copy on rank 0, a shard elsewhere.
    """
    model, rank = _rank0_reads(load, wrap, device)
    full = None
    if rank == 0:
        full = {n: p.detach() for n, p in model.named_parameters()}
        full.update({n: b.detach() for n, b in model.named_buffers()})
    fsdp2_shard(model, offload=offload)
    if rank != 0:
        model.to_empty(device="cpu" if offload else device)
    broadcast_from_rank0(model, full, "cpu" if offload else device)
    del full
    return model


@contextlib.contextmanager
def without_hf_zero3(plugin):
    """transformers sees ZeRO-3 through accelerate's global DeepSpeed config and then creates the
    model under zero.Init and refuses a device_map; load_zero3 partitions by itself, so hide it."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.dschf = None
        plugin.set_deepspeed_weakref()


def load_zero3(load, wrap, *, device: torch.device) -> torch.nn.Module:
    """RAM-efficient ZeRO-3 model: only rank 0 reads and quantizes the weights.

    DeepSpeed partitions a model it is given one parameter at a time: it broadcasts the
    parameter from rank 0, keeps this rank's slice and frees the rest. So the other ranks only
    need the right structure with allocated but untouched memory (no resident pages until
    DeepSpeed writes one parameter into it). Peak host memory: one 4-bit model on rank 0, about one
    parameter plus the shards elsewhere. Call `accelerator.prepare` under `model.streaming_malloc()`
    so each freed full parameter goes back to the OS."""
    import torch.distributed as dist

    model, rank = _rank0_reads(load, wrap, device, weights_on="cpu")
    if rank != 0:  # the rest of the skeleton (embeddings, norms, adapter): empty too
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.is_meta:
                    setattr(
                        module,
                        name,
                        torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad),
                    )
    with torch.no_grad():  # buffers (rotary frequencies): DeepSpeed partitions parameters only
        for module in model.modules():
            for name, b in list(module.named_buffers(recurse=False)):
                t = b.to(device) if rank == 0 else torch.empty(b.shape, dtype=b.dtype, device=device)
                dist.broadcast(t, 0)
                module._buffers[name] = t
    return model


def broadcast_from_rank0(model: torch.nn.Module, full: dict | None, device: torch.device) -> None:
    """Fill every rank's FSDP2 shards (and replicated buffers) from rank 0's full tensors.

    Non-zero ranks pass full=None: their scatter input is an untouched torch.empty, so it costs
    no resident memory; only their own shard is written."""
    import torch.distributed as dist

    rank = dist.get_rank()
    with torch.no_grad():
        _fill(model, full, device, rank)


def _fill(model: torch.nn.Module, full, device: torch.device, rank) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, param in model.named_parameters():
        src = full[name] if rank == 0 else torch.empty(param.shape, dtype=param.dtype, device=device)
        if isinstance(param, DTensor):
            shard = distribute_tensor(src.to(device), param.device_mesh, param.placements, src_data_rank=0)
            param.to_local().copy_(shard.to_local())
        else:
            tensor = src.to(device).contiguous()
            dist.broadcast(tensor, 0)
            param.data.copy_(tensor)
    for name, buf in model.named_buffers():
        tensor = (full[name] if rank == 0 else torch.empty(buf.shape, dtype=buf.dtype)).to(device).contiguous()
        dist.broadcast(tensor, 0)
        buf.copy_(tensor)
