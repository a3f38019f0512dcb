"""Built-in models and data, no network needed: tiny Llamas, a character tokenizer, arithmetic.

- `builtin:tiny-math`: the demo's base, a tiny Llama pretrained on two-digit addition by
  `launcher/demo/pretrain_tiny.py`; it ships in the package as a Hugging Face directory.
- `builtin:tiny-llama`: the same architecture with random weights, written once to the cache
  (tests and benchmarks that need a model, not a skill).
- `builtin:subtraction` (the demo's task) and `builtin:arithmetic` (additions): prompt/completion
  JSON Lines files in the package.

Each model is loaded through the same code path as any real model, so the demo exercises the
real loading, quantization and adapter-saving code, and plain `transformers`/`peft` can load
what it produces.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

TINY_LLAMA = "builtin:tiny-llama"
TINY_MATH = "builtin:tiny-math"
ARITHMETIC = "builtin:arithmetic"
SUBTRACTION = "builtin:subtraction"
DATA = {ARITHMETIC: "assets/arithmetic.jsonl", SUBTRACTION: "assets/subtraction.jsonl"}  # built-in data sets
_TINY_VERSION = "v1"  # bump when the tiny model's config or tokenizer changes

# Characters the demo data uses; one token each.
_CHARS = list("0123456789+-*=() abcdefghijklmnopqrstuvwxyz.,:?!\n")
_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

TINY_CONFIG: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def cache_dir() -> Path:
    """Where built-in artefacts live; LAUNCHER_CACHE overrides."""
    return Path(os.environ.get("LAUNCHER_CACHE", Path.home() / ".cache" / "qlora-launcher"))


def build_tokenizer():
    """A character-level fast tokenizer, built locally (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIAL + _CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def ensure_tiny_llama(seed: int = 0) -> Path:
    """Write the tiny model directory once; a file lock makes concurrent ranks wait for the first."""
    from filelock import FileLock

    target = cache_dir() / f"tiny-llama-{_TINY_VERSION}-seed{seed}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():  # else built by another process while we waited
            write_random_llama(target, seed, **TINY_CONFIG)
    return target


def write_random_llama(target: Path, seed: int = 0, dtype: str = "float32", **config) -> Path:
    """A Llama-architecture model with random weights and the character tokenizer, written as a
    local Hugging Face directory (atomically: readers never see a half-written one)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    cfg = LlamaConfig(
        **{"vocab_size": len(tok), **config},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    # Seeded on a forked stream: a run that builds the model (cold cache) must draw its LoRA init and
    # dropout from the same stream as a run that finds it built (the adapters differed by 0.3).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    # Not model.save_pretrained: transformers skips it on ranks other than 0 when a process
    # group exists, and whichever rank gets the lock first must write the files.
    cfg.save_pretrained(tmp)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors", metadata={"format": "pt"}
    )
    tok.save_pretrained(tmp)
    tmp.rename(target)
    return target


def _asset(name: str) -> Path:
    return Path(str(resources.files("launcher").joinpath(name)))


def arithmetic_path() -> Path:
    return _asset(DATA[ARITHMETIC])


def data_path(name: str) -> Path:
    """The file a built-in data name (builtin:subtraction, ...) stands for."""
    return _asset(DATA[name])


def tiny_math_path() -> Path:
    """The pretrained tiny base the package ships (see launcher/demo/pretrain_tiny.py)."""
    return _asset("assets/tiny-math")


def make_arithmetic(n: int = 4000, seed: int = 0) -> list[dict]:
    """Two-digit additions as prompt/completion pairs (how assets/arithmetic.jsonl was made)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"prompt": f"{a}+{b}=", "completion": f"{a + b}"})
    return rows


def make_subtraction(n: int = 4000, seed: int = 0) -> list[dict]:
    """`a-b=` with 0 <= b <= a <= 99, `n` distinct pairs in a seeded order (how
    assets/subtraction.jsonl was made): distinct, so a held-out prompt was never trained on."""
    pairs = [(a, b) for a in range(100) for b in range(a + 1)]
    random.Random(seed).shuffle(pairs)
    return [{"prompt": f"{a}-{b}=", "completion": f"{a - b}"} for a, b in pairs[:n]]


if __name__ == "__main__":  # regenerate the shipped data files
    for name, rows in ((ARITHMETIC, make_arithmetic()), (SUBTRACTION, make_subtraction())):
        with open(data_path(name), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
