"""What each of train.fused_ops' rewrites buys: time of a training step (forward + backward) and
bytes kept for backward, with none, each one alone, and all, in one process, variants alternating
step by step so drift hits all alike; medians.

The model is the benchmark's ~100M Llama (bench/vs_hf.py `100m`: hidden 768, intermediate 2048,
NF4 with double quantization, LoRA r 16 on every linear, fp32 on CPU) with fewer layers (--layers),
at 2 x 512 tokens, every layer recomputed (the CPU default) or none (--keep).

    python bench/fused_ops.py [--layers 4] [--steps 8] [--keep] [--json-out F]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.vs_hf import _100M  # noqa: E402
from launcher.run import fused  # noqa: E402
from launcher.run.model import enable_checkpointing  # noqa: E402

VARIANTS = {"none": (), **{k: (k,) for k in fused.KINDS}, "all": fused.KINDS}


def _model(src: str, kinds: tuple, keep: bool, compiled: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=q, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    if not keep:
        enable_checkpointing(model)
    model.enable_input_require_grads()
    fused.install(model, kinds)
    if compiled:
        fused.compile_layers(model)
    return model


def saved_mb(model, ids) -> float:
    """MB autograd keeps for backward with nothing recomputed (each storage once)."""
    seen: dict = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(seen.values()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (after one untimed)")
    ap.add_argument("--keep", action="store_true", help="no layer recomputed")
    ap.add_argument(
        "--compile", action="store_true", help="also all rewrites with train.compile (its first step: compile_s)"
    )
    ap.add_argument("--json-out")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = LlamaConfig(**{**_100M, "num_hidden_layers": args.layers, "vocab_size": 54})
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp)
        ids = torch.randint(0, 54, (2, 512), generator=torch.Generator().manual_seed(0))
        # what a kept layer costs: saved bytes with nothing recomputed, one model at a time
        kept = {name: saved_mb(_model(tmp, kinds, keep=True), ids) for name, kinds in VARIANTS.items()}
        models = {name: _model(tmp, kinds, args.keep) for name, kinds in VARIANTS.items()}
        if args.compile:
            models["all+compile"] = _model(tmp, fused.KINDS, args.keep, compiled=True)
            kept["all+compile"] = kept["all"]  # the eager count (AOTAutograd's partitioner may keep less)
    times: dict = {name: [] for name in models}
    first: dict = {}
    for i in range(args.steps + 1):
        for name, model in models.items():
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            elapsed = time.perf_counter() - start
            if i:
                times[name].append(elapsed)
            else:
                first[name] = elapsed  # with train.compile: the compile
    base = statistics.median(times["none"])
    out = {
        name: {
            "step_s": round(statistics.median(t), 4),
            "speedup": round(base / statistics.median(t), 3),
            "kept_layer_mb": round(kept[name] / args.layers, 2),
            "first_step_s": round(first[name], 2),
        }
        for name, t in times.items()
    }
    out["setting"] = {"layers": args.layers, "tokens": ids.numel(), "recomputed": not args.keep}
    print(json.dumps(out, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
