"""Loading the base model (quantized with bitsandbytes) and wrapping it with a peft adapter."""

from __future__ import annotations

import contextlib
import ctypes
import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from launcher.config.errors import UserError
from launcher.config.recipe import ModelCfg, PeftCfg, QuantCfg
from launcher.config.tables import STORAGE_DTYPES
from launcher.config.userio import first_line, quote
from launcher.demo import builtin
from launcher.plan import random_model
from launcher.plan.source import (
    model_config,
    resolve_source,  # noqa: F401  (where callers have always found it)
)
from launcher.run import attention, fused

if TYPE_CHECKING:  # annotations only
    from launcher.config.recipe import Recipe

DTYPES = {name: getattr(torch, name) for name in STORAGE_DTYPES}


def default_compute_dtype() -> torch.dtype:
    """bf16 where the GPU supports it, fp16 on older GPUs; fp32 on CPU (bf16 matmuls there are slow)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16 if torch.cuda.is_available() else torch.float32


def compute_dtype(quant: QuantCfg) -> torch.dtype:
    return default_compute_dtype() if quant.compute_dtype == "auto" else DTYPES[quant.compute_dtype]


def quantization_config(quant: QuantCfg, storage: torch.dtype | None = None):
    from transformers import BitsAndBytesConfig

    if quant.mode == "none":
        return None
    if quant.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if storage is None:
        storage = torch.uint8 if quant.storage_dtype == "auto" else DTYPES[quant.storage_dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.mode,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(quant),
        bnb_4bit_quant_storage=storage,
    )


def _load_error(what: str, source: str, err: Exception) -> UserError:
    return UserError(f"model.name: cannot load {what} from {quote(source)}: {first_line(err)}")


def _has_custom_code(source: str) -> bool:
    """Whether a local model directory's config or tokenizer config names custom classes (auto_map)."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            if "auto_map" in json.loads((Path(source) / name).read_text()):
                return True
        except (OSError, ValueError):
            continue
    return False


def load_tokenizer(source: str, model: ModelCfg):
    from transformers import AutoTokenizer

    if model.random_init and not any((Path(source) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return builtin.build_tokenizer()  # random weights need no matching vocabulary, only ids inside it
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as e:
        if not model.trust_remote_code and _has_custom_code(source):
            raise UserError(
                f"model.trust_remote_code: {quote(source)} ships its own code (auto_map) and it is false; "
                "set model.trust_remote_code=true if you trust that code"
            ) from None
        raise _load_error("the tokenizer", source, e) from None
    if tok.pad_token is None:  # Llama-style tokenizers ship without one
        tok.pad_token = tok.eos_token
    return tok


@contextlib.contextmanager
def streaming_malloc():
    """Hand freed load buffers back to the OS at once.

    transformers quantizes one tensor at a time, but glibc raises its mmap threshold (up to
    32 MB) after the first large free, so later per-tensor conversion buffers come from the
    heap and are kept there: host memory then grew to 2-7x the 4-bit model between identical
    runs (measured, 0.6 GB bf16 model: 0.26-1.45 GB). A fixed 1 MB threshold during the load
    keeps it at the model plus one tensor (0.26-0.29 GB); 32 MB afterwards is glibc's usual
    steady state, so training allocations reuse the heap. ZeRO-3 partitioning uses it too: each
    full parameter it frees must leave the process, not stay in the heap."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        yield
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 20)
    try:
        yield
    finally:
        libc.mallopt(m_mmap_threshold, 32 << 20)


def load_base_model(
    source: str,
    model: ModelCfg,
    quant: QuantCfg,
    device_map=None,
    storage: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
):
    """from_pretrained with the recipe's quantization; `device_map` and `storage` come from the placement.
    Weights are quantized as they are read, tensor by tensor: no 16-bit copy of the model is held."""
    from transformers import AutoModelForCausalLM

    if dtype is None:
        dtype = compute_dtype(quant) if model.dtype == "auto" else DTYPES[model.dtype]
    explicit = "attn_implementation" in model.model_fields_set
    attn = attention.choose(model.attn_implementation, explicit, model_config(source, model.trust_remote_code))
    with streaming_malloc():
        if model.random_init:
            return one_4bit_format(
                random_model.build(source, quantization_config(quant, storage), dtype, device_map, attn)
            )
        try:
            loaded = AutoModelForCausalLM.from_pretrained(
                source,
                revision=model.revision,
                dtype=dtype,
                quantization_config=quantization_config(quant, storage),
                device_map=device_map,
                attn_implementation=attn,
                trust_remote_code=model.trust_remote_code,
            )
        except (OSError, ValueError, ImportError) as e:
            raise _load_error("the model", source, e) from None
        except Exception as e:  # a weights file cut short or changed: safetensors' or torch's reader says so
            if type(e).__name__ != "SafetensorError" and "PytorchStreamReader" not in str(e):
                raise
            raise UserError(
                f"model.name: the weights in {quote(source)} are damaged ({first_line(e)[:120]}); "
                "copy or download the model again"
            ) from None
    return one_4bit_format(loaded)


def one_4bit_format(model: torch.nn.Module):
    """Keep every 4-bit layer in the format it was quantized in. On CPUs with AVX512-BF16,
    bitsandbytes 0.50 repacks a layer for a faster kernel the first time it runs in eval mode
    without gradients, rounding its absmax to bf16: after the first eval a run would go on training
    on slightly different base weights, and its evals would differ from a fresh load of the same
    adapter (seen here: logits 7e-4 apart after 30 steps)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of Linear layers (plain or bitsandbytes), lm_head excluded."""
    import bitsandbytes as bnb

    kinds = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, kinds)}
    names.discard("lm_head")
    return sorted(names)


def check_target_modules(model: torch.nn.Module, target) -> None:
    """A target that matches nothing is an error listing what exists (peft alone is vaguer)."""
    if target == "all-linear":
        return
    names = [n for n, _ in model.named_modules()]
    if isinstance(target, str):
        if not any(re.fullmatch(target, n) for n in names):
            raise UserError(
                f"peft.target_modules: regex {target!r} matches no module; linear layers: "
                f"{', '.join(linear_layer_names(model))}"
            )
        return
    missing = [t for t in target if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise UserError(
            f"peft.target_modules: {', '.join(missing)} not in the model; linear layers: "
            f"{', '.join(linear_layer_names(model))}"
        )


def peft_config(cfg: PeftCfg, total_steps: int | None = None):
    """Build peft's own config class for the method; unknown options are reported by name."""
    import peft

    explicit_targets = "target_modules" in cfg.model_fields_set
    common = dict(task_type="CAUSAL_LM")
    if cfg.method == "lora":
        cls, kw = (
            peft.LoraConfig,
            dict(
                r=cfg.r,
                lora_alpha=cfg.alpha,
                lora_dropout=cfg.dropout,
                bias=cfg.bias,
                target_modules=cfg.target_modules,
                use_dora=cfg.use_dora,
                use_rslora=cfg.use_rslora,
            ),
        )
    elif cfg.method == "adalora":
        cls, kw = (
            peft.AdaLoraConfig,
            dict(
                init_r=max(cfg.r * 3 // 2, cfg.r),
                target_r=cfg.r,
                lora_alpha=cfg.alpha,
                lora_dropout=cfg.dropout,
                target_modules=cfg.target_modules,
                total_step=total_steps,
            ),
        )
    elif cfg.method == "loha":
        cls, kw = (
            peft.LoHaConfig,
            dict(r=cfg.r, alpha=cfg.alpha, module_dropout=cfg.dropout, target_modules=cfg.target_modules),
        )
    elif cfg.method == "ia3":
        cls, kw = peft.IA3Config, dict(target_modules=cfg.target_modules if explicit_targets else None)
    elif cfg.method == "prompt_tuning":
        cls, kw = peft.PromptTuningConfig, dict(num_virtual_tokens=cfg.num_virtual_tokens)
    else:
        cls, kw = peft.PrefixTuningConfig, dict(num_virtual_tokens=cfg.num_virtual_tokens)
    kw.update(common)
    kw.update(cfg.options)
    try:
        return cls(**kw)
    except TypeError as e:
        raise UserError(f"peft.options: {cls.__name__} rejects them: {e}") from None
    except ValueError as e:
        raise UserError(f"peft: {cls.__name__}: {e}") from None


def apply_peft(
    model: torch.nn.Module,
    cfg: PeftCfg,
    *,
    quantized: bool,
    kbit_upcast: bool,
    gradient_checkpointing: bool,
    total_steps: int | None = None,
    checkpoint_every: int = 1,
    kept_layers: int = 0,
):
    """k-bit preparation (skipped when sharding: its fp32 upcast mixes dtypes), checkpointing, adapter.
    Every keyword is one decision the caller already made (the placement's upcast, the train section's
    checkpointing), passed as values so the trace and the run wrap a model the same way."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized and kbit_upcast:
        # Checkpointing is enabled below, not here: peft would call transformers' deprecated
        # gradient_checkpointing_enable (a FutureWarning on every run).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        enable_checkpointing(model, checkpoint_every, kept_layers)
    if cfg.method in ("lora", "adalora", "loha"):
        check_target_modules(model, cfg.target_modules)
    config = peft_config(cfg, total_steps)
    try:
        with quiet_peft():
            peft_model = get_peft_model(model, config, autocast_adapter_dtype=kbit_upcast)
    except (ValueError, TypeError, NotImplementedError) as e:
        hint = ""
        if "lora_dropout" in str(
            e
        ):  # a MoE router or expert is a parameter, not a layer: peft wraps it without dropout
            hint = "; set peft.dropout=0, or list peft.target_modules without the router and experts"
        raise UserError(
            f"peft.method: {cfg.method} cannot wrap this model "
            f"(quant.mode={'4/8-bit' if quantized else 'none'}): {first_line(e)}{hint}"
        ) from None
    if gradient_checkpointing:
        model.disable_input_require_grads()  # peft's, for an unquantized base (see enable_checkpointing)
    return peft_model


def adapter_for(
    recipe: Recipe, base: torch.nn.Module, *, kbit_upcast: bool, total_steps: int | None = None, kept_layers: int = 0
):
    """The recipe's adapter and checkpointing on the base, as every strategy (and the trace) wraps it."""
    model = apply_peft(
        base,
        recipe.peft,
        quantized=recipe.quant.mode != "none",
        kbit_upcast=kbit_upcast,
        gradient_checkpointing=recipe.train.gradient_checkpointing,
        total_steps=total_steps,
        checkpoint_every=recipe.train.checkpoint_every,
        kept_layers=kept_layers,
    )
    if recipe.train.fused_ops:
        fused.install(model)
    return model


@contextlib.contextmanager
def quiet_peft():
    """peft's PeftModel reads transformers' deprecated `is_gradient_checkpointing` property (peft 0.21,
    transformers 5): that FutureWarning is about peft's code, not the user's, so it is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def enable_checkpointing(model: torch.nn.Module, every: int = 1, kept: int = 0) -> None:
    """Non-reentrant activation checkpointing on every `every`-th decoder layer (layers 0, every, 2 every,
    ...), except the last `kept` layers, which keep their activations (they are the first backward
    frees, so the layers recomputed after them start from a lower peak); through transformers' current
    API (`activation_checkpointing_enable`, transformers 5); older transformers only checkpoint all layers."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every)
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for layer in layers[len(layers) - kept :] if kept else []:
            layer.gradient_checkpointing = False
        # transformers makes the embeddings' output require grad, which reentrant checkpointing needs;
        # non-reentrant does not, and with it backward would run the first layer's input gradients
        # (q/k/v, its norm) into the frozen embeddings for nothing.
        model.disable_input_require_grads()
        return
    if every != 1 or kept:
        raise UserError(
            "train.checkpoint_every/memory_budget_gb: need transformers 5 (activation_checkpointing_enable); unset them"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), counting packed 4-bit weights as the parameters they hold."""
    return model.get_nb_trainable_parameters()
