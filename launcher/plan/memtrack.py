"""Counting tensor memory while real code runs, on real or fake tensors, by category.

A dispatch mode sees every op's outputs; each new storage becomes a `Block` whose end is noticed
through a weak reference, and FSDP2's in-place storage resizes (how it frees and re-allocates the
gathered parameters) are reported to it. Nothing is summed while the step runs: the events are
replayed afterwards, once every block's category (and so whether it lives on the device or the
host) is known. torch's MemTracker does the same job but registers a gradient hook on every
parameter, which a frozen 4-bit base refuses, and it cannot tell activations kept for backward
from temporaries.

Categories: parameters, gradients, optimizer_state (named by the caller when those tensors
exist), gathered_params (FSDP's unsharded copies), activations (created in forward and still alive
when it returns: what backward needs) and temporaries (everything else: dequantized weights,
recomputed layers, logits' gradients, communication buffers).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

CATEGORIES = ("parameters", "gradients", "optimizer_state", "gathered_params", "activations", "temporaries")
OWNED = ("parameters", "gradients", "optimizer_state")  # named by the caller, never by the phase
HOST_WHEN_OFFLOADED = ("parameters", "gradients", "optimizer_state")  # FSDP2's CPUOffloadPolicy keeps these on the CPU


@dataclass(eq=False)
class Block:
    nbytes: int
    phase: str  # setup | forward | backward | optimizer: when it was created
    category: str = ""  # decided by `own`, `kept` or at the end
    alive: bool = True


def storages(t: torch.Tensor) -> list:
    """The storages behind a tensor (a DTensor's local shard, a plain tensor's own)."""
    if is_traceable_wrapper_subclass(t):
        inner = [getattr(t, name) for name in t.__tensor_flatten__()[0]]
        return [s for x in inner if isinstance(x, torch.Tensor) for s in storages(x)]
    return [t.untyped_storage()]


@dataclass
class Peak:
    total: float = 0.0
    by_category: dict = field(default_factory=dict)


class Tracker(TorchDispatchMode):
    """Records allocations and frees of every storage created while active. fake=True (under a
    FakeTensorMode): ops whose tensor inputs are all real run for real, as the host-side batch
    bookkeeping does (a decision read from a fake tensor would fail or go the wrong way)."""

    def __init__(self, fake: bool = False):
        super().__init__()
        self.fake = fake
        self.blocks = WeakIdKeyDictionary()  # storage -> Block
        self.events: list[tuple[Block, int]] = []
        self.phase = "setup"
        self.gemm_4bit = _gemm_4bit_op()
        self._extra: list[Block] = []

    # ---------------------------------------------------------------- recording

    def _see(self, st, phase: str | None = None) -> Block:
        block = self.blocks.get(st)
        if block is not None:
            return block
        n = st.nbytes()
        block = Block(n, phase or self.phase)
        self.blocks[st] = block
        weakref.finalize(st, self._freed, block)
        self.events.append((block, n))
        return block

    def _freed(self, block: Block) -> None:
        if block.alive:
            block.alive = False
            self.events.append((block, -block.nbytes))

    def resized(self, t: torch.Tensor) -> None:
        """A storage changed size in place (FSDP2 frees gathered parameters with resize_(0))."""
        for st in storages(t):
            block = self._see(st)
            n = st.nbytes()
            if n != block.nbytes:
                self.events.append((block, n - block.nbytes))
                block.nbytes = n
                block.category = block.category or "gathered_params"

    def own(self, tensors, category: str) -> None:
        """Name what these tensors are (existing ones are counted from the start if new to the tracker)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                for st in storages(t):
                    self._see(st, "setup").category = category

    def block(self, nbytes: int, category: str) -> None:
        """Memory the code allocates where no dispatch mode sees it (DDP's reducer, in C++)."""
        block = Block(nbytes, "setup", category)
        self._extra.append(block)
        self.events.append((block, nbytes))

    def own_unnamed(self, category: str) -> None:
        """Name every live block that has no category yet."""
        for block in self.blocks.values():
            if block.alive and not block.category:
                block.category = category

    def rebase(self) -> None:
        """Forget the history: what is alive now is where the count starts."""
        live = [b for b in list(self.blocks.values()) + self._extra if b.alive]
        self.events = [(b, b.nbytes) for b in live]

    def mark_forward_end(self) -> None:
        """What forward created and still holds is what backward needs: activations."""
        for block in self.blocks.values():
            if block.alive and block.phase == "forward" and not block.category:
                block.category = "activations"

    # ---------------------------------------------------------------- the dispatch mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is self.gemm_4bit and func is not None:
            return self._gemm_4bit(*args, **kwargs)
        if self.fake and _all_real(args, kwargs):
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return self._call(func, *args, **kwargs)

    def _call(self, func, *args, **kwargs):
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                for st in storages(t):
                    self._see(st)
        return out

    def _gemm_4bit(
        self,
        A,
        B,
        shapeB,
        absmax,
        blocksize,
        quant_type,
        bias=None,
        absmax_8bit=None,
        absmax_code=None,
        absmax_offset=None,
    ):
        """bitsandbytes' fused 4-bit matmul as its CUDA fallback and CPU kernel run it (dequantize the
        weight, then one matmul): a fake kernel would only show the output, not the dequantized weight.
        The parameters are the op's own (`torch.ops.bitsandbytes.gemm_4bit`)."""
        ops = torch.ops.bitsandbytes
        if absmax_8bit is not None:
            absmax = self._call(ops.dequantize_blockwise.default, absmax_8bit, absmax, absmax_code, 256, torch.float32)
            absmax = self._call(torch.ops.aten.add.Tensor, absmax, absmax_offset)
        weight = self._call(ops.dequantize_4bit.default, B, absmax, blocksize, quant_type, shapeB, A.dtype)
        return self._call(torch.ops.aten.linear.default, A, weight, bias)

    # ---------------------------------------------------------------- after the run

    def peaks(self, offloaded: bool = False) -> dict[str, Peak]:
        """{"device": Peak, "host": Peak}: the largest total of live blocks over the run and what it was
        made of. Offloaded: parameters, gradients and optimizer state are on the host."""
        totals = {"device": 0, "host": 0}
        parts = {"device": dict.fromkeys(CATEGORIES, 0), "host": dict.fromkeys(CATEGORIES, 0)}
        best = {"device": Peak(), "host": Peak()}
        for block, delta in self.events:
            cat = block.category or "temporaries"
            where = "host" if offloaded and cat in HOST_WHEN_OFFLOADED else "device"
            totals[where] += delta
            parts[where][cat] += delta
            if totals[where] > best[where].total:
                best[where] = Peak(totals[where], dict(parts[where]))
        return best


def _all_real(args, kwargs) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    return bool(tensors) and not any(isinstance(t, FakeTensor) or is_traceable_wrapper_subclass(t) for t in tensors)


def _gemm_4bit_op():
    try:
        import bitsandbytes  # noqa: F401  (registers its ops)

        return torch.ops.bitsandbytes.gemm_4bit.default
    except (ImportError, AttributeError, RuntimeError):
        return None


@contextlib.contextmanager
def fsdp_resizes(tracker: Tracker):
    """Tell the tracker when FSDP2 allocates or frees a gathered parameter's storage in place."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    alloc, free = _fsdp_param.alloc_storage, _fsdp_param.free_storage

    def tracked_alloc(tensor):
        alloc(tensor)
        tracker.resized(tensor)

    def tracked_free(tensor):
        free(tensor)
        tracker.resized(tensor)

    patched = [
        (_fsdp_param, "alloc_storage", tracked_alloc),
        (_fsdp_param, "free_storage", tracked_free),
        (_fsdp_param_group, "alloc_storage", tracked_alloc),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patched]
    for mod, name, fn in patched:
        setattr(mod, name, fn)
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
