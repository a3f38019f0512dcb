"""Architectures: what memory and structure depend on in a Llama-style decoder, and the presets.

A leaf module (it imports nothing of the launcher's but its error type), so the planner, the
random-weight builder and the model source resolution can all read the presets without
importing each other. Llama-style configs are planned from their keys; other architectures
from the modules transformers builds for them on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.config.errors import UserError


@dataclass(frozen=True)
class Arch:
    """What memory depends on in a Llama-style decoder."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    # Read from the model itself (other architectures): each layer's 4-bit linears, and every
    # other parameter (embeddings, head, norms, biases, experts kept as 3-D tensors).
    layer_linears: tuple[tuple[str, int, int], ...] = ()
    rest: int | None = None

    @classmethod
    def from_config(cls, cfg: dict, name: str = "local") -> "Arch":
        """Llama-style configs by their keys (the planner's calibration); any other architecture
        transformers can build, from its modules on the meta device (`from_model`)."""
        if cfg.get("model_type", "llama") not in LLAMA_STYLE:
            return cls.from_model(cfg, name)
        try:
            return cls(
                name=name,
                hidden=cfg["hidden_size"],
                intermediate=cfg["intermediate_size"],
                layers=cfg["num_hidden_layers"],
                heads=cfg["num_attention_heads"],
                kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                vocab=cfg["vocab_size"],
                tied=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
            )
        except KeyError as e:
            raise UserError(
                f"model.name: config.json of {name} lacks {e.args[0]}; the planner knows "
                "Llama-style decoders (hidden_size, intermediate_size, num_hidden_layers, ...)"
            ) from None

    @classmethod
    def from_model(cls, cfg: dict, name: str = "local") -> "Arch":
        """The architecture as transformers builds it, on the meta device (no memory, no weights):
        GPT-2's Conv1D and fused qkv, BLOOM, OPT, MoE experts, Gemma's head_dim, Phi-3's fused
        projections all count as they are. Config names (n_embd, n_layer, ffn_dim) are mapped by
        transformers' own config classes."""
        model = meta_model(cfg, name)
        config = model.config
        units = set(getattr(model, "_no_split_modules", None) or ())
        layers = [m for m in model.modules() if type(m).__name__ in units]
        if not layers:
            raise UserError(f"model.name: {name}: found no decoder layers to plan (no _no_split_modules)")
        linears = tuple(
            (n, *_in_out(m)) for n, m in layers[0].named_modules() if type(m).__name__ in ("Linear", "Conv1D")
        )
        total = sum(p.numel() for p in model.parameters())
        hidden = config.hidden_size
        heads = config.num_attention_heads
        width = [getattr(config, k, None) for k in ("intermediate_size", "ffn_dim", "n_inner")]
        return cls(
            name=name,
            hidden=hidden,
            intermediate=next((w for w in width if w), 4 * hidden),
            layers=len(layers),
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            layer_linears=linears,
            rest=total - len(layers) * sum(i * o for _, i, o in linears),
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """Per layer: name -> (in, out)."""
        if self.layer_linears:
            return {n: (i, o) for n, i, o in self.layer_linears}
        h, kv = self.hidden, self.kv_heads * (self.hidden // self.heads)
        f = self.intermediate
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, f),
            "up_proj": (h, f),
            "down_proj": (f, h),
        }

    @property
    def quantized_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linears().values())

    @property
    def other_params(self) -> int:
        """Embeddings, lm_head, norms, biases: never quantized."""
        if self.rest is not None:
            return self.rest
        bias = self.layers * (self.hidden + 2 * self.linears()["k_proj"][1]) if self.qkv_bias else 0
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden + bias

    @property
    def params(self) -> int:
        return self.quantized_params + self.other_params

    def lora_params(self, r: int, targets) -> int:
        chosen = (
            self.linears()
            if targets in ("all-linear", None)
            else {k: v for k, v in self.linears().items() if k.split(".")[-1] in targets}
        )
        return self.layers * sum(r * (i + o) for i, o in chosen.values())


LLAMA_STYLE = {"llama", "mistral", "qwen2"}  # q/k/v/o and gate/up/down, sized by the config's keys


def _in_out(module) -> tuple[int, int]:
    if type(module).__name__ == "Conv1D":  # GPT-2's transposed linear: weight is (in, out)
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


def meta_model(cfg: dict, name: str):
    """The model transformers builds for a config.json, on the meta device."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        fields = {k: v for k, v in cfg.items() if k != "model_type"}
        config = AutoConfig.for_model(cfg.get("model_type", ""), **fields)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError, ImportError) as e:
        raise UserError(
            f"model.name: the planner cannot build {name} ({cfg.get('model_type')!r}) from its config.json: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


# Published config.json values.
PRESETS = {
    a.name: a
    for a in (
        Arch("llama-7b", 4096, 11008, 32, 32, 32, 32000),
        Arch("llama-13b", 5120, 13824, 40, 40, 40, 32000),
        Arch("llama-33b", 6656, 17920, 60, 52, 52, 32000),
        Arch("llama-65b", 8192, 22016, 80, 64, 64, 32000),
        Arch("llama-2-7b", 4096, 11008, 32, 32, 32, 32000),
        Arch("llama-2-13b", 5120, 13824, 40, 40, 40, 32000),
        Arch("llama-2-70b", 8192, 28672, 80, 64, 8, 32000),
        Arch("llama-3-8b", 4096, 14336, 32, 32, 8, 128256),
        Arch("llama-3-70b", 8192, 28672, 80, 64, 8, 128256),
        Arch("llama-3.1-405b", 16384, 53248, 126, 128, 8, 128256),
        Arch("mistral-7b", 4096, 14336, 32, 32, 8, 32000),
        Arch("yi-34b", 7168, 20480, 60, 56, 8, 64000),
        Arch("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, qkv_bias=True),
        Arch("qwen2.5-72b", 8192, 29568, 80, 64, 8, 152064, qkv_bias=True),
    )
}
# Hub names that map onto a preset, so a recipe naming one plans without a download.
HUB = {
    "huggyllama/llama-7b": "llama-7b",
    "huggyllama/llama-13b": "llama-13b",
    "huggyllama/llama-30b": "llama-33b",
    "huggyllama/llama-65b": "llama-65b",
    "meta-llama/Llama-2-7b-hf": "llama-2-7b",
    "meta-llama/Llama-2-13b-hf": "llama-2-13b",
    "meta-llama/Llama-2-70b-hf": "llama-2-70b",
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b",
    "meta-llama/Meta-Llama-3-70B": "llama-3-70b",
    "meta-llama/Llama-3.1-8B": "llama-3-8b",
    "meta-llama/Llama-3.1-70B": "llama-3-70b",
    "meta-llama/Llama-3.1-405B": "llama-3.1-405b",
    "mistralai/Mistral-7B-v0.1": "mistral-7b",
    "01-ai/Yi-34B": "yi-34b",
    "Qwen/Qwen2.5-7B": "qwen2.5-7b",
    "Qwen/Qwen2.5-72B": "qwen2.5-72b",
}
