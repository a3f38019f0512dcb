"""Peak host memory of a 2-rank QLoRA load, per strategy (CPU, gloo).

Builds a Llama-architecture model with random weights (default ~0.4B parameters, bf16
safetensors on disk), then runs `launcher train` for one step under each strategy and
reports the host memory each rank's load added at its peak, next to the model's 16-bit size. Usage:
    python bench/load_rss.py [--layers 16 --hidden 1024] [--strategies ddp,zero3]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def build_model(path: Path, layers: int, hidden: int) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.demo.builtin import build_tokenizer

    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters()) * 2 / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--strategies", default="ddp,zero3")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        size_gb = build_model(model_dir, args.layers, args.hidden)
        print(f"model: {args.layers} layers, hidden {args.hidden}; 16-bit size {size_gb:.2f} GB")
        for strategy in args.strategies.split(","):
            run = Path(tmp) / strategy
            cmd = [
                sys.executable,
                "-m",
                "launcher",
                "train",
                f"model.name={model_dir}",
                f"dist.strategy={strategy}",
                "dist.nproc=2",
                f"train.output_dir={run}",
                "train.max_steps=1",
                "train.warmup_steps=0",
                "data.max_samples=64",
                "train.micro_batch_size=2",
                "train.eval_every=1000",
                "train.gradient_checkpointing=true",
                "data.eval_fraction=0",
                "data.path=builtin:arithmetic",  # the data the calibration was measured on
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                print(f"{strategy}: failed\n{res.stderr[-2000:]}")
                continue
            s = json.loads((run / "summary.json").read_text())
            load = s["load_host_gb_per_rank"]
            print(
                json.dumps(
                    {
                        "strategy": strategy,
                        "load_added_rss_gb_per_rank": load,
                        "node_sum_gb": round(sum(load), 2),
                        "peak_rss_gb_per_rank": s["peak_mem_gb_per_rank"],
                        "model_16bit_gb": round(size_gb, 2),
                        "load_s": s["load_s"],
                    }
                )
            )


if __name__ == "__main__":
    main()
