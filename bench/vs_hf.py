"""The same QLoRA fine-tune two ways, alternating, in fresh processes: this launcher, and the
Hugging Face path a user would otherwise write (transformers Trainer + peft + bitsandbytes).

Same base (4-bit NF4, double quant), same LoRA config, same tokenized data (prompt masked),
same micro batch, steps, optimizer, schedule, clipping and seed. Reported per run: useful
(non-padding) tokens/s over the training loop, wall time, time to the first optimizer step
(process start to the end of step 1, imports and loading included), peak RSS, final eval loss;
then the launcher / HF ratios of the medians.

    python bench/vs_hf.py [--steps 200] [--repeats 2] [--model tiny|100m] [--packing]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # Llama-architecture configs with random weights, built locally
    "tiny": None,  # the launcher's built-in 0.96M model
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, max_position_embeddings=512, tie_word_embeddings=False),
}


def build_model(kind: str, where: Path) -> str:
    if MODELS[kind] is None:
        return "builtin:tiny-llama"
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.builtin import build_tokenizer

    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **MODELS[kind])
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(where)
    tok.save_pretrained(where)
    return str(where)


def common(model: str, steps: int, packing: bool) -> list[str]:
    return [f"model.name={model}", f"train.max_steps={steps}", "train.micro_batch_size=32", "train.warmup_steps=10",
            "train.log_every=50", f"train.eval_every={steps}", f"train.save_every={steps}", "data.max_samples=4000",
            "train.report_to=[]", f"data.packing={'true' if packing else 'false'}"]


def run_launcher(model: str, steps: int, packing: bool, out: Path) -> dict:
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "launcher", "train", f"train.output_dir={out}",
                          *common(model, steps, packing)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if res.returncode:
        raise SystemExit(f"launcher run failed:\n{res.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {"tokens_per_s": s["tokens_per_s_rank0"], "wall_s": wall, "first_step_s": s["first_step_s"],
            "peak_rss_gb": s["peak_mem_gb_per_rank"][0], "eval_loss": s["eval_loss"]}


HF_SCRIPT = r'''
import json, resource, sys, time
import psutil, torch
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer,
                          TrainerCallback, TrainingArguments)
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from launcher import data
from launcher.model import load_tokenizer, resolve_source
from launcher.recipe import load_recipe

recipe = load_recipe(None, json.loads(sys.argv[1]))
out = sys.argv[2]
source = resolve_source(recipe.model)
tok = load_tokenizer(source, recipe.model)
train_ex, eval_ex, _ = data.load_data(recipe.data, tok, recipe.train.seed)
strip = lambda exs: [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in exs]
bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(source, quantization_config=bnb, dtype=torch.float32)
model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
p = recipe.peft
model = get_peft_model(model, LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout,
                                         target_modules="all-linear", task_type="CAUSAL_LM"))
t = recipe.train
timing = {}

class FirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        timing.setdefault("first_step_s", time.time() - psutil.Process().create_time())

args = TrainingArguments(output_dir=out, per_device_train_batch_size=t.micro_batch_size,
                         per_device_eval_batch_size=t.micro_batch_size, gradient_accumulation_steps=t.grad_accum,
                         learning_rate=t.lr, max_steps=t.max_steps, lr_scheduler_type=t.scheduler,
                         warmup_steps=t.warmup_steps, optim=t.optimizer, max_grad_norm=t.max_grad_norm,
                         weight_decay=t.weight_decay, logging_steps=t.log_every, eval_strategy="steps",
                         eval_steps=t.max_steps, save_strategy="no", report_to=[], seed=t.seed, use_cpu=True,
                         gradient_checkpointing=False, remove_unused_columns=False, dataloader_num_workers=0)
trainer = Trainer(model=model, args=args, train_dataset=strip(train_ex), eval_dataset=strip(eval_ex),
                  data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
                  callbacks=[FirstStep()])
real = sum(len(e["input_ids"]) for e in train_ex)
result = trainer.train()
evals = [r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r]
steps_tokens = real / len(train_ex) * t.max_steps * t.micro_batch_size * t.grad_accum  # mean tokens x samples
print(json.dumps({"train_runtime": result.metrics["train_runtime"], "tokens": steps_tokens,
                  "first_step_s": timing["first_step_s"], "eval_loss": evals[-1],
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
'''


def run_hf(model: str, steps: int, out: Path) -> dict:
    overrides = [c for c in common(model, steps, False) if not c.startswith(("train.report_to", "data.packing"))]
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", HF_SCRIPT, json.dumps(overrides), str(out)], capture_output=True,
                         text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if res.returncode:
        raise SystemExit(f"HF run failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    return {"tokens_per_s": r["tokens"] / r["train_runtime"], "wall_s": wall, "first_step_s": r["first_step_s"],
            "peak_rss_gb": r["peak_rss_gb"], "eval_loss": r["eval_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--packing", action="store_true")
    args = ap.parse_args()
    runs = {"launcher": [], "hf": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.model, Path(tmp) / "model")
        for i in range(args.repeats):  # alternate so drift hits both the same
            runs["launcher"].append(run_launcher(model, args.steps, args.packing, Path(tmp) / f"l{i}"))
            runs["hf"].append(run_hf(model, args.steps, Path(tmp) / f"h{i}"))
            print(json.dumps({"repeat": i, **{k: v[-1] for k, v in runs.items()}}), flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    ratio = {k: round(med["launcher"][k] / med["hf"][k], 3) for k in med["hf"]}
    print(json.dumps({"model": args.model, "steps": args.steps, "packing": args.packing, "median": med,
                      "launcher_over_hf": ratio}, indent=1))


if __name__ == "__main__":
    main()
