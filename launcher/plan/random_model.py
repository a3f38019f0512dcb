"""Random-weight models for scaling experiments, created layer by layer on the target device.

A 65B model is 130 GB in 16-bit: writing it to disk to load it back is slow and needs the RAM
and disk a user may not have. Instead the model is built on the meta device (no memory), the
linear layers are swapped for bitsandbytes 4-bit ones by transformers' own quantizer, and then
each tensor is created on the device and, for a linear layer, quantized at once: the peak is
the 4-bit model plus one 16-bit matrix.

`model.random_init: true` selects this; `model.name` is a planner preset (llama-65b, ...) or a
directory with a config.json (its weights, if any, are ignored).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from launcher.demo import builtin
from launcher.plan.archs import PRESETS

SEED = 1234  # the same base weights on every rank and every run (DDP needs identical replicas)


def preset_dir(name: str) -> Path:
    """A directory with the preset's config.json and the built-in tokenizer (a few KB, written once)."""
    from filelock import FileLock

    a = PRESETS[name]
    target = builtin.cache_dir() / f"random-{name}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            tok = builtin.build_tokenizer()
            cfg = dict(
                model_type="qwen2" if a.qkv_bias else "llama",
                architectures=None,
                hidden_size=a.hidden,
                intermediate_size=a.intermediate,
                num_hidden_layers=a.layers,
                num_attention_heads=a.heads,
                num_key_value_heads=a.kv_heads,
                vocab_size=a.vocab,
                tie_word_embeddings=a.tied,
                max_position_embeddings=8192,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            tmp = target.with_name(target.name + ".tmp")
            tmp.mkdir(exist_ok=True)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
            tok.save_pretrained(tmp)
            tmp.rename(target)
    return target


def _device(device_map) -> torch.device:
    """The one device the weights are created on (a random model is never spread over GPUs)."""
    if device_map == "meta":
        return torch.device("meta")
    if isinstance(device_map, dict) and len(set(device_map.values())) == 1:
        d = next(iter(device_map.values()))
        return torch.device(f"cuda:{d}" if isinstance(d, int) else d)
    if device_map == "auto" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")  # None: ZeRO-3/FSDP load on the host and shard from there


def build(source: str, quantization_config, dtype: torch.dtype, device_map=None, attn_implementation: str = "sdpa"):
    """The model of `source`'s config.json with random weights (normal, std = initializer_range),
    4-bit layers quantized as they are created. Same result on every call with the same device type."""
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with init_empty_weights():  # parameters on meta, buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    quantizer = None
    if quantization_config is not None:
        from transformers.quantizers import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
        quantizer.preprocess_model(model, device_map={"": "cpu"}, dtype=dtype)  # swaps in bnb linear layers
    device = _device(device_map)
    if device.type != "meta":
        gen = torch.Generator(device=device).manual_seed(SEED)
        std = getattr(config, "initializer_range", 0.02)
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if isinstance(p, bnb.nn.Params4bit):
                    w = torch.empty(p.shape, dtype=dtype, device=device).normal_(0, std, generator=gen)
                    q = bnb.nn.Params4bit(
                        w,
                        requires_grad=False,
                        blocksize=p.blocksize,
                        quant_type=p.quant_type,
                        compress_statistics=p.compress_statistics,
                        quant_storage=p.quant_storage,
                        module=module,
                    )
                    setattr(module, name, q.to(device))  # type: ignore[misc]  # quantizes; the 16-bit matrix is freed here
                elif isinstance(p, bnb.nn.Int8Params):
                    w = torch.empty(p.shape, dtype=dtype, device=device).normal_(0, std, generator=gen)
                    w = w.to(device="cpu", dtype=torch.float16)  # Int8Params quantizes on the way to the GPU
                    setattr(module, name, bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to(device))  # type: ignore[misc]
                else:
                    value = (
                        torch.ones(p.shape, dtype=dtype, device=device)
                        if "norm" in type(module).__name__.lower()
                        else torch.empty(p.shape, dtype=dtype, device=device).normal_(0, std, generator=gen)
                    )
                    setattr(module, name, torch.nn.Parameter(value, requires_grad=p.requires_grad))
            for name, b in list(module.named_buffers(recurse=False)):
                module._buffers[name] = b.to(device)
    if quantizer is not None:
        quantizer.postprocess_model(model)  # marks the model 4-bit for peft and records the config
        model.hf_quantizer = quantizer
    return model
