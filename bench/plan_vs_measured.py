"""The memory planner's estimate next to the measured peak, on this machine.

CPU (default): one process, peak resident set size (what summary.json reports on CPU).
GPU (--gpu): one process, torch.cuda.max_memory_allocated plus the planner's overhead term.
Each configuration trains a few steps with packing, so every row holds exactly max_seq_len tokens.

    python bench/plan_vs_measured.py                 # tiny and ~100M models on CPU
    python bench/plan_vs_measured.py --gpu --sizes 1b,8b
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# name -> LlamaConfig overrides (random weights, written locally)
SIZES = {
    "tiny": None,  # the built-in demo model
    "100m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}
# (size, micro batch, seq len, gradient checkpointing)
CPU_RUNS = [("tiny", 32, 32, True), ("100m", 4, 256, True), ("100m", 4, 256, False)]
GPU_RUNS = [("1b", 4, 1024, True), ("8b", 2, 2048, True), ("8b", 1, 1024, False)]


# The calibration's own settings: every layer recomputed, the loss in one piece (not the auto choices).
FIXED = ("train.memory_budget_gb=null", "train.chunked_loss=0", "train.fused_ops=false")


def model_dir(size: str, root: Path, gpu: bool) -> str:
    """CPU: weights written to disk and loaded as usual. GPU: only config.json; the weights are made
    on the GPU layer by layer (model.random_init), the same model without writing 16 GB."""
    if SIZES[size] is None:
        return "builtin:tiny-llama"
    from launcher.demo.builtin import write_random_llama

    path = root / size
    if not path.exists():
        if gpu:
            from transformers import LlamaConfig

            LlamaConfig(**SIZES[size]).save_pretrained(path)
        else:
            write_random_llama(path, dtype="float32", **SIZES[size])
    return str(path)


def measure(model: str, mb: int, seq: int, gc: bool, out: Path, random_init: bool) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "launcher",
        "train",
        f"model.name={model}",
        f"train.output_dir={out}",
        f"model.random_init={str(random_init).lower()}",
        "train.max_steps=3",
        "train.warmup_steps=0",
        f"train.micro_batch_size={mb}",
        f"data.max_seq_len={seq}",
        "data.packing=true",
        f"train.gradient_checkpointing={str(gc).lower()}",
        *FIXED,
        "train.eval_every=1000",
        "data.eval_fraction=0",
        "data.path=builtin:arithmetic",  # the data the calibration was measured on
        "data.max_samples=4000",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return json.loads((out / "summary.json").read_text())


def planned(model: str, mb: int, seq: int, gc: bool, gpu: bool) -> float:
    from launcher.config.recipe import load_recipe
    from launcher.plan import planner

    recipe = load_recipe(
        None,
        [
            f"model.name={model}",
            f"train.micro_batch_size={mb}",
            f"data.max_seq_len={seq}",
            f"train.gradient_checkpointing={str(gc).lower()}",
            *FIXED,
        ],
    )
    arch = planner.arch_for_recipe(recipe)
    setup = planner.setup_for_recipe(recipe, 1, 1, gpu=gpu)
    p = planner.estimate(arch, "single", setup)
    return p.allocated if gpu else p.device_total  # max_memory_allocated on a GPU, resident size on CPU


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--sizes", help="comma list to restrict the runs, e.g. 100m")
    args = ap.parse_args()
    runs = GPU_RUNS if args.gpu else CPU_RUNS
    if args.sizes:
        runs = [r for r in runs if r[0] in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, (size, mb, seq, gc) in enumerate(runs):
            model = model_dir(size, root, args.gpu)
            random_init = args.gpu and SIZES[size] is not None  # model_dir wrote only config.json
            summary = measure(model, mb, seq, gc, root / f"run{i}", random_init)
            measured = max(summary["peak_mem_gb_per_rank"])  # max_memory_allocated on a GPU
            plan = planned(model, mb, seq, gc, args.gpu)
            print(
                json.dumps(
                    {
                        "size": size,
                        "params": summary["total_params"],
                        "micro_batch": mb,
                        "seq_len": seq,
                        "gradient_checkpointing": gc,
                        "measured_gb": round(measured, 3),
                        "planned_gb": round(plan, 3),
                        "ratio": round(plan / measured, 3),
                        "reserved_gb": summary.get("peak_reserved_gb_per_rank"),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
