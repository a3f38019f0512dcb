"""Attention for packed rows without work across samples.

transformers' "sdpa" runs a packed row (several samples, positions restarting at 0) as one
full-width SDPA call under a block-diagonal mask: every row costs width^2 whatever its samples,
and a masked call cannot use the fused causal kernel. The "sdpa" a recipe names is registered
here under NAME instead: rows with a padding mask, or a KV cache, go to transformers' own SDPA
unchanged; packed rows run one causal SDPA call per sample, so attention costs sum(len^2), as
flash-attention's varlen kernel does on GPU. Rows of short samples (mean under MIN_MEAN_LEN)
take one call under a block-diagonal mask instead. Same math, same result up to rounding.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

NAME = "launcher_sdpa"
# Below this mean sample length per row, one masked call beats many tiny ones: on CPU, 25 calls
# of ~10 tokens per row took more memory (+0.27 GB peak on a 108M model, 4 x 256) than the mask.
MIN_MEAN_LEN = 64
_segments_of: tuple = (None, None)  # (weakref to the position_ids tensor, its segments): one lookup per forward


def causal_lm_class(config: dict):
    """The transformers class a config.json loads as a causal LM, or None when unknown (remote code)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for arch in config.get("architectures") or []:
        if arch.endswith("ForCausalLM") and hasattr(transformers, arch):
            return getattr(transformers, arch)
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    return getattr(transformers, name, None) if name else None


SUPPORT_FLAGS = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}  # eager: every model


def choose(requested: str, explicit: bool, config: dict) -> str:
    """The implementation to load with. An architecture without SDPA (Gemma 2: its attention logit
    soft-capping) gets eager with a one-line note when the recipe left the default; a choice the
    recipe made explicitly, or flash-attention, is refused naming the value that works."""
    from launcher.config.errors import UserError
    from launcher.run import console

    cls = causal_lm_class(config)
    flag = SUPPORT_FLAGS.get(requested)
    if cls is None or flag is None or getattr(cls, flag, True):
        return implementation(requested)
    if requested == "sdpa" and not explicit:
        console.say(f"note: {cls.__name__} has no SDPA attention; using eager (model.attn_implementation=eager)")
        return "eager"
    raise UserError(f"model.attn_implementation: {cls.__name__} does not support {requested}; use eager")


def implementation(name: str) -> str:
    """The transformers attention implementation for the recipe's model.attn_implementation."""
    if name != "sdpa":
        return name
    register()
    return NAME


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, _mask)


def _mask(
    *, attention_mask=None, q_length=None, kv_length=None, local_size=None, use_vmap=False, config=None, **kwargs
):
    """No 4-D mask for a plain causal mask over full-length or packed rows (packed_sdpa finds the
    samples from the position ids); transformers' SDPA mask for anything else: padding, a KV cache,
    a sliding window, a bidirectional or custom mask."""
    from transformers.masking_utils import sdpa_mask

    plain = (
        attention_mask is None
        and q_length == kv_length
        and local_size is None
        and not use_vmap
        and "allow_is_bidirectional_skip" not in kwargs
        and getattr(config, "is_causal", True)
    )
    if plain:
        return None
    return sdpa_mask(
        attention_mask=attention_mask,
        q_length=q_length,
        kv_length=kv_length,
        local_size=local_size,
        use_vmap=use_vmap,
        config=config,
        **kwargs,
    )


def segments(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the start of every sample and the row's width: a sample starts wherever the
    position does not follow the previous one. Computed once per forward (one host sync), not per layer."""
    global _segments_of
    ref, segs = _segments_of
    if ref is not None and ref() is position_ids:
        return segs
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    width = position_ids.shape[1]
    segs = [row.nonzero().flatten().tolist() + [width] for row in starts.cpu()]
    _segments_of = (weakref.ref(position_ids), segs)
    return segs


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query (batch, heads, len, dim), key/value (batch, kv_heads, len, dim) -> (batch, len, heads, dim).
    The parameters are transformers' attention-interface signature (`sdpa_attention_forward`'s)."""
    position_ids = kwargs.get("position_ids")
    if (
        attention_mask is not None
        or position_ids is None
        or query.shape[2] != key.shape[2]
        or not getattr(module, "is_causal", True)
    ):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    gqa = query.shape[1] != key.shape[1]

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)

    segs = segments(position_ids)
    if len(segs) != query.shape[0]:  # one row of position ids shared by the batch
        segs = segs * query.shape[0]
    width = query.shape[2]
    if all(len(s) == 2 for s in segs):  # one sample per row: a single fused causal call
        out = attend(query, key, value)
    elif any((len(s) - 1) * MIN_MEAN_LEN > width for s in segs):  # short samples: one block-diagonal call
        seg = torch.zeros(position_ids.shape, dtype=torch.long, device=query.device)
        seg[:, 1:] = (position_ids[:, 1:] != position_ids[:, :-1] + 1).cumsum(-1)
        seg = seg.expand(query.shape[0], -1)
        causal = torch.ones(width, width, dtype=torch.bool, device=query.device).tril()
        mask = (seg[:, None, :, None] == seg[:, None, None, :]) & causal
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa
        )
    else:
        rows = []
        for b, bounds in enumerate(segs):
            parts = [
                attend(query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e])
                for s, e in zip(bounds[:-1], bounds[1:])
            ]
            rows.append(torch.cat(parts, dim=2))
        out = torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None
