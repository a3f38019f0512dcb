"""How the demo's pretrained base was made: a tiny Llama that knows two-digit addition.

QLoRA teaches a frozen *pretrained* base a new skill. With no network the base cannot be a hub
model, so this script pretrains one: the tiny Llama architecture of `builtin:tiny-llama` (4 layers,
hidden 128, 0.8M parameters, the character tokenizer), full precision, every one of the 10,000
additions `a+b=` with a, b in 0..99 (loss on the answer and its end-of-sequence token), AdamW at
3e-3 with cosine decay, batch 256, 1,200 steps from seed 0.

    python -m launcher.demo.pretrain_tiny  # rewrites launcher/assets/tiny-math (about 2 minutes on 2 CPU cores)

The result ships in the package (1.6 MB: trained in fp32, stored in bf16) as `builtin:tiny-math`;
the demo quantizes it to NF4 like any other base and fine-tunes an adapter that teaches it
subtraction, which it has never seen. Measured: the NF4 base answers 100% of additions and 1% of
held-out subtractions exactly; the demo's
adapter brings held-out subtractions to the figure README states. The same seed, torch build and
thread count give the same weights.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from launcher.demo import builtin

if TYPE_CHECKING:  # annotations only
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SEED = 0
STEPS = 1200
BATCH = 256
LR = 3e-3


def additions() -> list[tuple[str, str]]:
    return [(f"{a}+{b}=", str(a + b)) for a in range(100) for b in range(100)]


def encode(tok: PreTrainedTokenizerBase, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids and labels: the prompt masked (-100), the answer and end-of-sequence learned."""
    p = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + a, [-100] * len(p) + a


def pretrain(out: Path, steps: int = STEPS, seed: int = SEED, log_every: int = 200) -> Path:
    """Train the tiny Llama on addition and write it as a Hugging Face directory at `out`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = builtin.build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        **builtin.TINY_CONFIG,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    rows = [encode(tok, p, a) for p, a in additions()]
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    rng, start = random.Random(seed), time.perf_counter()
    for step in range(steps):
        ids, labels = _batch(rng.sample(rows, BATCH), tok.pad_token_id)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if log_every and step % log_every == 0:
            print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    _write(model, tok, Path(out))
    return Path(out)


def _batch(items, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(ids) for ids, _ in items)
    ids = torch.tensor([i + [pad] * (n - len(i)) for i, _ in items])
    labels = torch.tensor([lab + [-100] * (n - len(lab)) for _, lab in items])
    return ids, labels


def _write(model: PreTrainedModel, tok: PreTrainedTokenizerBase, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.config.dtype = torch.bfloat16  # stored in bf16: 1.6 MB instead of 3.2 (NF4 quantizes it anyway)
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    tok.save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=builtin.tiny_math_path())
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    torch.set_num_threads(2)  # the thread count the shipped weights were made with
    pretrain(args.out, args.steps, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
