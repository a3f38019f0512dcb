"""Build a tiny random model of each architecture, train a packed LoRA run on it with eval_accuracy,
and save the in-memory model's logits on a fixed probe: one process for all of them (imports once).

python train_archs.py OUT_DIR ARCH [ARCH ...]   ->  OUT_DIR/ARCH/{model/, run/, probe.pt} or OUT_DIR/ARCH/error.txt
"""

import sys
import traceback
from pathlib import Path

import torch

from launcher.config.recipe import load_recipe
from launcher.demo import builtin
from launcher.run.train import train

PROBE = torch.tensor([[1, 5, 6, 14, 7, 8, 17], [1, 9, 9, 14, 9, 9, 17]])

# Small configs of the architectures users bring (2 layers, hidden 64, 4 heads, 2 KV heads).
ARCHS = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16},
    "phi3": {},
    "gpt_neox": {"num_key_value_heads": None},
}


def build(arch: str, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = builtin.build_tokenizer()
    kw = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    kw.update(ARCHS[arch])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(arch, **{k: v for k, v in kw.items() if v is not None})
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1])
    for arch in sys.argv[2:]:
        where = root / arch
        where.mkdir(parents=True, exist_ok=True)
        try:
            model_dir = build(arch, where / "model")
            recipe = load_recipe(
                None,
                [
                    f"model.name={model_dir}",
                    "data.packing=true",
                    "data.max_samples=400",
                    "train.max_steps=4",
                    "train.warmup_steps=0",
                    "train.eval_every=4",
                    "train.save_every=4",
                    "train.eval_accuracy_samples=8",
                    f"train.output_dir={where / 'run'}",
                ],
            )
            summary, model = train(recipe)
            model.eval()
            with torch.no_grad():
                torch.save(model(input_ids=PROBE).logits, where / "probe.pt")
        except Exception:
            (where / "error.txt").write_text(traceback.format_exc())
