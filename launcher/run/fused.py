"""Fewer passes over memory and fewer bytes kept per decoder layer (`train.fused_ops`).

Three rewrites of what transformers and peft run, each with the same arithmetic:
- the LoRA linear: peft copies the base output (a "defensive" clone, then `result + B(A(x)) * s`:
  three passes over the output and two temporaries); here one `add(result, B(A(x)), alpha=s)`;
- SwiGLU (`act(gate) * up`): autograd keeps gate, act(gate) and up; here only gate and up, act
  recomputed in backward (as Liger's kernel does);
- RMSNorm: autograd keeps an fp32 copy of a bf16 input and rstd twice; here the input and rstd.

Measured on traces of the real step (planner.FUSED_SAVED): per token and decoder layer, 4 bytes per
intermediate unit fewer in fp32 (57 KB at Llama-3-8B, 8 KB at the 100M benchmark model), 2 per
intermediate and 4 per hidden unit in bf16.

Installed on the module instances (their classes, names and state dicts stay), so checkpointing,
FSDP and ZeRO wrap the same modules. Any case outside the rewrite (merged or disabled adapters,
several adapters, DoRA, a LoRA bias) takes peft's own forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Norms computing weight * (x * rsqrt(mean(x^2) + eps)).to(dtype) in fp32 (Gemma's 1 + weight is not).
NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MixtralRMSNorm"})
# MLPs computing down(silu(gate(x)) * up(x)).
MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up for backward (not silu(gate))."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_up = F.silu(gate).mul_(grad)
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad_up


class RMSNorm(torch.autograd.Function):
    """weight * (x * rstd).to(dtype), in fp32 as transformers computes it, keeping x and rstd."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float().mul_(rstd)
        grad_weight = None
        if ctx.needs_input_grad[1]:  # a frozen norm (LoRA's) skips this reduction
            grad_weight = (grad * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        g = (grad * weight).float()
        dot = (g * xhat).mean(-1, keepdim=True)
        grad_x = g.sub_(xhat.mul_(dot)).mul_(rstd)
        return grad_x.to(x.dtype), grad_weight, None


def _norm(module):
    def forward(hidden_states):
        return RMSNorm.apply(hidden_states, module.weight, module.variance_epsilon)

    return forward


def _mlp(module):
    def forward(x):
        return module.down_proj(SwiGLU.apply(module.gate_proj(x), module.up_proj(x)))

    return forward


def _lora(module):
    """peft's vanilla LoRA forward (lora.Linear, bnb Linear4bit/8bitLt) without its copy of the output."""
    original = module.forward

    def forward(x, *args, **kwargs):
        names = module.active_adapters
        if module.disable_adapters or module.merged or args or kwargs or len(names) != 1:
            return original(x, *args, **kwargs)
        name = names[0]
        if name not in module.lora_A or name in module.lora_variant or module.lora_B[name].bias is not None:
            return original(x, *args, **kwargs)
        a = module.lora_A[name]
        out = module.lora_B[name](a(module.lora_dropout[name](module._cast_input_dtype(x, a.weight.dtype))))
        # The frozen matmul last: it saves nothing for backward, so a checkpointed layer's recompute
        # (which stops at its last saved tensor) skips the layer's last one (down_proj's).
        result = module.base_layer(x)
        scaling = module.scaling[name]
        if out.dtype == result.dtype:
            return torch.add(result, out, alpha=scaling)
        return result + (out * scaling).to(result.dtype)  # peft's arithmetic, its rounding

    return forward


KINDS = ("lora", "swiglu", "rmsnorm")


def _kind(module) -> str | None:
    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer) and isinstance(getattr(module, "base_layer", None), torch.nn.Linear):
        return "lora"  # lora.Linear, bnb's Linear4bit and Linear8bitLt
    name = type(module).__name__
    if name in NORMS:
        return "rmsnorm"
    if name in MLPS and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"):
        return "swiglu"
    return None


def install(model: torch.nn.Module, kinds: tuple[str, ...] = KINDS) -> dict[str, int]:
    """Rewrite the supported modules in place (`kinds`: which rewrites, for measuring each); how
    many of each kind were rewritten."""
    rewrite = {"lora": _lora, "swiglu": _mlp, "rmsnorm": _norm}
    counts = dict.fromkeys(kinds, 0)
    for module in model.modules():
        kind = _kind(module)
        if kind in counts:
            module.forward = rewrite[kind](module)
            counts[kind] += 1
    return counts


def compile_layers(model: torch.nn.Module) -> int:
    """train.compile: each decoder layer compiled in place (`Module.compile`: names, state dict and the
    checkpointing wrapper stay), all dimensions dynamic so a packed row's length does not recompile;
    one compiled graph is reused by every layer of the same code. How many layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
