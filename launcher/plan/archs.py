"""Architectures: what memory and structure depend on in a Llama-style decoder, and the presets.

A leaf module (it imports nothing of the launcher's but its error type), so the planner, the
random-weight builder and the model source resolution can all read the presets without
importing each other.
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

    @classmethod
    def from_config(cls, cfg: dict, name: str = "local") -> "Arch":
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

    def linears(self) -> dict[str, tuple[int, int]]:
        """Per layer: name -> (in, out)."""
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
        bias = self.layers * (self.hidden + 2 * self.linears()["k_proj"][1]) if self.qkv_bias else 0
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden + bias

    @property
    def params(self) -> int:
        return self.quantized_params + self.other_params

    def lora_params(self, r: int, targets) -> int:
        chosen = (
            self.linears()
            if targets in ("all-linear", None)
            else {k: v for k, v in self.linears().items() if k in targets}
        )
        return self.layers * sum(r * (i + o) for i, o in chosen.values())


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
        Arch("mistral-7b", 4096, 14336, 32, 32, 8, 32000),
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
    "mistralai/Mistral-7B-v0.1": "mistral-7b",
    "Qwen/Qwen2.5-7B": "qwen2.5-7b",
    "Qwen/Qwen2.5-72B": "qwen2.5-72b",
}
