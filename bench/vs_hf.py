"""The same QLoRA fine-tune two ways, alternating, in fresh processes: this launcher, and the
Hugging Face path a user would otherwise write (transformers Trainer + peft + bitsandbytes).

Same base (4-bit NF4, double quant), same LoRA config, same tokenized data (prompt masked),
same optimizer, schedule, clipping and seed. Reported per run: useful (non-padding) tokens/s
over the training loop, wall time, time to the first optimizer step (process start to the end of
step 1, imports, tokenization and loading included), peak memory (RSS on CPU; allocated and
reserved on GPU), final eval loss, and MFU: on CPU against the matmul FLOP/s this machine sustains
at the step's shapes, measured in the same run before and after (bench/matmul_peak.py), with the
step's FLOPs per useful token as the planner counts them (throughput.flops_per_token); then the
launcher / HF ratios of the medians.

Two workloads:
- `--data arithmetic` (CPU default): the built-in 8-token samples, the same micro batch (32) and
  number of steps both ways; `--packing` lets the launcher pack.
- `--data long` (always with --gpu): variable-length samples (log-normal lengths, median 22% of
  max_seq_len, up to max_seq_len - 48; chains of additions), one epoch over the same samples. The
  launcher packs them into 2 rows of max_seq_len per step (~7 samples); the HF path pads each batch
  of 8 samples to its longest (DataCollatorForSeq2Seq, what a Trainer user writes). So both see the
  same samples once, in about the same number of optimizer steps.
GPU (--gpu): Llama-architecture models with random weights (1B, 8B) at max_seq_len 2048. MFU counts
6 x parameters FLOPs per useful token (frozen weights included, attention excluded) over the GPU's
dense bf16 peak.

    python bench/vs_hf.py [--steps 200] [--repeats 2] [--model tiny|100m] [--packing]
    python bench/vs_hf.py --data long [--model tiny] [--seq-len 512] [--samples 1000] [--nproc 2]
    python bench/vs_hf.py --gpu --model 1b [--samples 1500]
"""

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_100M = dict(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
MODELS = {  # Llama-architecture configs with random weights, built locally
    "tiny": None,  # the launcher's built-in 0.96M model
    "100m": _100M,
    # The ~100M model with a Llama-2-sized vocabulary: the logits (tokens x 32000) dominate the
    # activation memory there, as in real models (the char tokenizer uses only the first 54 ids).
    "100m-32k": dict(_100M, vocab_size=32000),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
}
RUN_TIMEOUT_S = 3600  # one side's run (--run-timeout): a hang ends the benchmark with a line naming it


def run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    """One process tree (its own session, so a hung rank dies with the launcher); SystemExit on a hang."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw
    )
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        raise SystemExit(f"{what} did not exit within {RUN_TIMEOUT_S} s (hung); its last output:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16


def builtin_dir(model: str) -> Path:
    from launcher.demo import builtin

    return builtin.ensure_tiny_llama() if model == "builtin:tiny-llama" else Path(model)


def build_model(kind: str, where: Path, gpu: bool) -> str:
    """A local model directory (config, safetensors, tokenizer) both paths load from."""
    if MODELS[kind] is None:
        return "builtin:tiny-llama"
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from launcher.demo.builtin import build_tokenizer
    from launcher.plan import random_model

    tok = build_tokenizer()
    cfg = LlamaConfig(
        **{"vocab_size": len(tok), **MODELS[kind]},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg.save_pretrained(where)
    # made on the GPU in bf16 (seconds for 8B), fp32 on CPU
    model = random_model.build(str(where), None, torch.bfloat16 if gpu else torch.float32, {"": 0} if gpu else None)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        where / "model.safetensors",
        metadata={"format": "pt"},
    )
    del model
    tok.save_pretrained(where)
    return str(where)


def long_samples(path: Path, n: int, seq_len: int, seed: int = 0) -> str:
    """Variable-length prompt/completion pairs (chains of additions), one token per character."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            length = int(min(seq_len - 48, max(40, rng.lognormvariate(math.log(0.22 * seq_len), 0.75))))
            text = ""
            while len(text) < length:
                a, b = rng.randint(0, 999), rng.randint(0, 999)
                text += f"{a}+{b}={a + b}, "
            text = text[:length]
            f.write(json.dumps({"prompt": text[: length // 4], "completion": text[length // 4 :]}) + "\n")
    return str(path)


def common(model: str, args, data_path: str | None) -> list[str]:
    """Recipe overrides both paths read (the HF script takes its settings from the same recipe)."""
    if args.data == "long":
        return [
            f"model.name={model}",
            f"data.path={data_path}",
            f"data.max_seq_len={args.seq_len}",
            "train.epochs=1",
            "train.max_steps=null",
            f"data.max_samples={args.samples}",
            "train.warmup_steps=10",
            "train.log_every=50",
            "train.eval_every=100000",
            "train.save_every=100000",
            "train.report_to=[]",
            "train.optimizer=paged_adamw_32bit",
            "data.eval_fraction=0.05",
            "train.eval_accuracy_samples=0",  # the HF path has no generation eval: time only training
        ]
    return [
        f"model.name={model}",
        "data.path=builtin:arithmetic",  # the 8-token additions these figures were measured on
        "train.eval_accuracy_samples=0",
        f"train.max_steps={args.steps}",
        "train.micro_batch_size=32",
        "train.warmup_steps=10",
        "train.log_every=50",
        f"train.eval_every={args.steps}",
        f"train.save_every={args.steps}",
        "data.max_samples=4000",
        "train.report_to=[]",
    ]


def run_launcher(overrides: list[str], packing: bool, long: bool, out: Path, nproc: int = 1) -> dict:
    extra = ["train.micro_batch_size=2"] if long else []
    start = time.perf_counter()
    res = run(
        [
            sys.executable,
            "-m",
            "launcher",
            "train",
            f"train.output_dir={out}",
            *overrides,
            *extra,
            f"dist.nproc={nproc}",
            f"data.packing={'true' if packing else 'false'}",
        ],
        "the launcher's run",
    )
    wall = time.perf_counter() - start
    if res.returncode:
        raise SystemExit(f"launcher run failed:\n{res.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {
        "tokens_per_s": s["tokens_per_s"],
        "wall_s": wall,
        "first_step_s": s["first_step_s"],
        "peak_gb": s["peak_mem_gb_per_rank"][0],
        "reserved_gb": (s.get("peak_reserved_gb_per_rank") or [0])[0],
        "eval_loss": s["eval_loss"],
        "steps": s["steps"],
    }


HF_SCRIPT = r"""
import dataclasses, json, math, resource, sys, time
import psutil, torch
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer,
                          TrainerCallback, TrainingArguments)
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from launcher.run import data
from launcher.run.model import load_tokenizer, resolve_source
from launcher.config.recipe import load_recipe

recipe = load_recipe(None, json.loads(sys.argv[1]))
out, mb, group = sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
gpu = torch.cuda.is_available()
dtype = torch.bfloat16 if gpu else torch.float32
source = resolve_source(recipe.model)
tok = load_tokenizer(source, recipe.model)
train_ex, eval_ex, _ = data.load_data(recipe.data, tok, recipe.train.seed)
strip = lambda exs: [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in exs]
bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=dtype)
model = AutoModelForCausalLM.from_pretrained(source, quantization_config=bnb, dtype=dtype,
                                             device_map={"": 0} if gpu else None)
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

names = {f.name for f in dataclasses.fields(TrainingArguments)}  # the option was renamed in transformers 5
group_kw = ({"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in names
            else {"group_by_length": True}) if group else {}
steps = t.max_steps or math.ceil(len(train_ex) / (mb * t.grad_accum) * t.epochs)
args = TrainingArguments(output_dir=out, per_device_train_batch_size=mb, per_device_eval_batch_size=mb,
                         gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, max_steps=t.max_steps or -1,
                         num_train_epochs=t.epochs, lr_scheduler_type=t.scheduler,
                         warmup_steps=t.warmup_steps, optim=t.optimizer, max_grad_norm=t.max_grad_norm,
                         weight_decay=t.weight_decay, logging_steps=t.log_every, eval_strategy="steps",
                         eval_steps=steps, save_strategy="no", report_to=[], seed=t.seed, use_cpu=not gpu,
                         bf16=gpu, gradient_checkpointing=False, remove_unused_columns=False, dataloader_num_workers=0,
                         **group_kw)
trainer = Trainer(model=model, args=args, train_dataset=strip(train_ex), eval_dataset=strip(eval_ex),
                  data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
                  callbacks=[FirstStep()])
real = sum(len(e["input_ids"]) for e in train_ex)
result = trainer.train()
evals = [r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r]
trainer.save_model(out)  # the adapter, for the common held-out evaluation
world = trainer.args.world_size  # the Trainer splits the epoch across ranks; max_steps counts global steps
samples = t.max_steps * mb * t.grad_accum * world if t.max_steps else len(train_ex) * t.epochs
peak = (torch.cuda.max_memory_allocated() / 2**30 if gpu
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
if trainer.args.process_index == 0:
    print(json.dumps({"train_runtime": result.metrics["train_runtime"], "tokens": real / len(train_ex) * samples,
                      "first_step_s": timing["first_step_s"], "eval_loss": evals[-1], "peak_gb": peak,
                      "reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if gpu else 0,
                      "steps": trainer.state.global_step}))
if torch.distributed.is_initialized():  # the Trainer leaves it up; torn down at exit, a loaded machine saw
    torch.distributed.destroy_process_group()  # "terminate called without an active exception" (SIGABRT)
"""


TRL_SCRIPT = r"""
import json, resource, sys, time
import psutil, torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
from trl import SFTConfig, SFTTrainer
from launcher.run import data
from launcher.run.model import load_tokenizer, resolve_source
from launcher.config.recipe import load_recipe

# TRL's best settings for packed SFT (trl 1.16): best-fit-decreasing packing into rows of max_length,
# padding-free rows with position ids (TRL turns padding_free on for bfd), the loss on the completion
# only (our labels: the prompt is -100), the same 4-bit base, LoRA, optimizer, schedule and clipping.
recipe = load_recipe(None, json.loads(sys.argv[1]))
out, mb = sys.argv[2], int(sys.argv[3])
gpu = torch.cuda.is_available()
dtype = torch.bfloat16 if gpu else torch.float32
source = resolve_source(recipe.model)
tok = load_tokenizer(source, recipe.model)
train_ex, eval_ex, _ = data.load_data(recipe.data, tok, recipe.train.seed)  # unpacked: TRL packs
rows = lambda exs: Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in exs])
bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=dtype)
model = AutoModelForCausalLM.from_pretrained(source, quantization_config=bnb, dtype=dtype,
                                             device_map={"": 0} if gpu else None)
p, t = recipe.peft, recipe.train
timing = {}

class FirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        timing.setdefault("first_step_s", time.time() - psutil.Process().create_time())

args = SFTConfig(output_dir=out, per_device_train_batch_size=mb, per_device_eval_batch_size=mb,
                 gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, max_steps=t.max_steps or -1,
                 num_train_epochs=t.epochs, lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_steps,
                 optim=t.optimizer, max_grad_norm=t.max_grad_norm, weight_decay=t.weight_decay,
                 logging_steps=t.log_every, eval_strategy="no", save_strategy="no", report_to=[], seed=t.seed,
                 use_cpu=not gpu, bf16=gpu, packing=True, packing_strategy="bfd", padding_free=True,
                 max_length=recipe.data.max_seq_len, gradient_checkpointing=t.gradient_checkpointing,
                 gradient_checkpointing_kwargs={"use_reentrant": False}, dataloader_num_workers=0)
trainer = SFTTrainer(model=model, args=args, train_dataset=rows(train_ex), eval_dataset=rows(eval_ex),
                     processing_class=tok, callbacks=[FirstStep()],
                     peft_config=LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))
real = sum(len(e["input_ids"]) for e in train_ex)
result = trainer.train()
ev = trainer.evaluate()  # after training, outside train_runtime
trainer.save_model(out)  # the adapter, for the common held-out evaluation
peak = (torch.cuda.max_memory_allocated() / 2**30 if gpu
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
if trainer.args.process_index == 0:
    print(json.dumps({"train_runtime": result.metrics["train_runtime"], "tokens": real * t.epochs,
                      "first_step_s": timing["first_step_s"], "eval_loss": ev["eval_loss"], "peak_gb": peak,
                      "reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if gpu else 0,
                      "steps": trainer.state.global_step}))
if torch.distributed.is_initialized():  # the Trainer leaves it up; torn down at exit, a loaded machine saw
    torch.distributed.destroy_process_group()  # "terminate called without an active exception" (SIGABRT)
"""


EVAL_SCRIPT = r"""
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from launcher.run import data
from launcher.run.model import load_tokenizer, resolve_source
from launcher.config.recipe import load_recipe

# One evaluation for every side: the saved adapter on the same NF4 base through plain peft, the mean
# loss over every label token of the same held-out samples (the recipe's eval split), one sample at a
# time so no packing or padding choice of either side enters it.
recipe = load_recipe(None, json.loads(sys.argv[1]))
gpu = torch.cuda.is_available()
dtype = torch.bfloat16 if gpu else torch.float32
source = resolve_source(recipe.model)
tok = load_tokenizer(source, recipe.model)
_, eval_ex, _ = data.load_data(recipe.data, tok, recipe.train.seed)
bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=dtype)
base = AutoModelForCausalLM.from_pretrained(source, quantization_config=bnb, dtype=dtype,
                                            device_map={"": 0} if gpu else None)
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
total, count = 0.0, 0
with torch.no_grad():
    for e in eval_ex:
        ids = torch.tensor([e["input_ids"]], device=model.device)
        labels = torch.tensor([e["labels"]], device=model.device)
        n = int((labels[:, 1:] != data.IGNORE).sum())
        if n:
            total += model(input_ids=ids, labels=labels, use_cache=False).loss.item() * n
            count += n
print(json.dumps({"heldout_loss": total / max(count, 1), "heldout_tokens": count}))
"""


def heldout(overrides: list[str], adapter_dir: Path) -> dict:
    """The common held-out loss of a saved adapter (EVAL_SCRIPT, a fresh process, not timed)."""
    script = adapter_dir.with_name("eval.py")
    script.write_text(EVAL_SCRIPT)
    res = run(
        [sys.executable, str(script), json.dumps(overrides), str(adapter_dir)], "the held-out evaluation", cwd=ROOT
    )
    if res.returncode:
        raise SystemExit(f"held-out evaluation of {adapter_dir} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_hf(
    overrides: list[str], long: bool, out: Path, group_by_length: bool = False, nproc: int = 1, trl: bool = False
) -> dict:
    """The baseline: transformers' Trainer (padded batches of 8), or with `trl` TRL's SFTTrainer packing
    the same samples into rows of max_seq_len, 2 per step per rank like the launcher."""
    mb = ("2" if trl else "8") if long else "32"
    from launcher.cli import _free_port

    script = out.with_suffix(".py")
    script.write_text(TRL_SCRIPT if trl else HF_SCRIPT)
    # Several processes: torchrun, as a Trainer user would launch it (gloo DDP on CPU).
    cmd = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"]
        if nproc > 1
        else [sys.executable]
    )
    start = time.perf_counter()
    res = run(
        [*cmd, str(script), json.dumps(overrides), str(out), mb, "1" if group_by_length else "0"],
        "the TRL run" if trl else "the Trainer run",
        cwd=ROOT,
    )
    wall = time.perf_counter() - start
    if res.returncode:
        raise SystemExit(f"HF run failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    return {
        "tokens_per_s": r["tokens"] / r["train_runtime"],
        "wall_s": wall,
        "first_step_s": r["first_step_s"],
        "peak_gb": r["peak_gb"],
        "reserved_gb": r["reserved_gb"],
        "eval_loss": r["eval_loss"],
        "steps": r["steps"],
    }


@contextlib.contextmanager
def instrumented(where: Path, tool: str, env: str):
    """Runs started inside import bench/<tool>/sitecustomize.py (it acts when `env` names a folder, and
    every rank inherits both); yields a list that gets what rank 0 wrote there, when they are done."""
    where.mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in (env, "PYTHONPATH")}
    path = [str(ROOT / "bench" / tool), saved["PYTHONPATH"] or ""]
    os.environ.update({env: str(where), "PYTHONPATH": os.pathsep.join(filter(None, path))})
    out: list = []
    try:
        yield out
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out.extend(json.loads(f.read_text()) for f in sorted(where.glob("*.json")))


@contextlib.contextmanager
def live_peak(where: Path):
    """Runs started inside count their live tensor memory (bench/live_peak/sitecustomize.py); yields a
    dict that gets "live_peak_gb", rank 0's peak, when they are done."""
    out: dict = {}
    with instrumented(where, "live_peak", "LIVE_PEAK_DIR") as peaks:
        yield out
    out["live_peak_gb"] = max((r["live_peak_gb"] for r in peaks if r["rank"] == 0), default=None)


def mfu(tokens_per_s: float, model_dir: str) -> float | None:
    """6 x parameters per useful token over the GPU's dense bf16 peak (None when the GPU is unknown)."""
    import torch

    from launcher.plan import planner
    from launcher.run import placement

    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    params = planner.Arch.from_config(placement.model_config(model_dir)).params
    return peak and round(6 * params * tokens_per_s / (peak * 1e12), 4)


class CpuCeiling:
    """The matmul FLOP/s this CPU sustains at the step's shapes (bench/matmul_peak.py): measured before
    the runs and again after, so drift over the benchmark shows."""

    def __init__(self, model: str, tokens: int):
        sys.path.insert(0, str(ROOT))
        from bench.matmul_peak import peak_flops, step_shapes

        self.measure = lambda: peak_flops(step_shapes(str(builtin_dir(model))), tokens)
        self.peaks = [self.measure()]

    def measure_again(self) -> list[float]:
        """Both measurements in GFLOP/s."""
        self.peaks.append(self.measure())
        return [round(p / 1e9, 1) for p in self.peaks]


def cpu_utilisation(model: str, seq_len: int, peak: float) -> float:
    """FLOPs per useful token as the planner counts them (forward and input gradient of the frozen
    path, the recompute of checkpointed layers, the adapter's full backward, attention) over the
    matmul FLOP/s measured in this run: multiply by tokens/s for MFU."""
    from launcher.plan import planner, throughput
    from launcher.plan.source import model_config

    arch = planner.Arch.from_config(model_config(str(builtin_dir(model))))
    return throughput.flops_per_token(arch, planner.Setup(seq_len=seq_len, lora_r=16)) / peak


def main() -> None:
    global RUN_TIMEOUT_S
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200, help="CPU: optimizer steps")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--packing", action="store_true", help="CPU: the launcher packs (always on with --gpu)")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--data", choices=["arithmetic", "long"], default="arithmetic")
    ap.add_argument("--seq-len", type=int, help="--data long: max_seq_len (default 2048 on GPU, 512 on CPU)")
    ap.add_argument("--samples", type=int, default=1000, help="--data long: samples in the one epoch")
    ap.add_argument("--nproc", type=int, default=1, help="CPU: processes per run (DDP over gloo both ways)")
    ap.add_argument(
        "--baseline",
        choices=["trainer", "trl"],
        default="trainer",
        help="trl: TRL's SFTTrainer with bfd packing and padding-free rows (pip install -e .[bench]); --data long",
    )
    ap.add_argument(
        "--launcher-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for the launcher side only (a gain under test, e.g. train.checkpoint_every=2)",
    )
    ap.add_argument(
        "--live-memory",
        action="store_true",
        help="CPU: one more, untimed run per side counting live tensor memory (the GPU's allocated memory)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="CPU: one more, untimed run per side under torch.profiler: seconds per step by kind of work",
    )
    ap.add_argument("--json-out", help="also write the summary here")
    ap.add_argument(
        "--run-timeout", type=int, default=RUN_TIMEOUT_S, help="seconds one run may take before it counts as hung"
    )
    ap.add_argument(
        "--hf-group-by-length",
        action="store_true",
        help="a stronger baseline: the Trainer batches samples of similar length (less padding)",
    )
    args = ap.parse_args()
    RUN_TIMEOUT_S = args.run_timeout
    if args.gpu or args.baseline == "trl":
        args.data = "long"
    args.seq_len = args.seq_len or (2048 if args.gpu else 512)
    long = args.data == "long"
    runs = {"launcher": [], "hf": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.model, Path(tmp) / "model", args.gpu)
        ceiling = None if args.gpu else CpuCeiling(model, 2 * args.seq_len if long else 32 * 8)
        data_path = long_samples(Path(tmp) / "data.jsonl", args.samples + 100, args.seq_len) if long else None
        overrides = common(model, args, data_path)
        for i in range(args.repeats):  # alternate so drift hits both the same
            runs["launcher"].append(
                run_launcher(overrides + args.launcher_set, args.packing or long, long, Path(tmp) / f"l{i}", args.nproc)
            )
            runs["hf"].append(
                run_hf(
                    overrides, long, Path(tmp) / f"h{i}", args.hf_group_by_length, args.nproc, args.baseline == "trl"
                )
            )
            for name, out in (("launcher", f"l{i}"), ("hf", f"h{i}")):  # the same evaluation for both
                runs[name][-1].update(heldout(overrides, Path(tmp) / out))
            print(json.dumps({"repeat": i, **{k: v[-1] for k, v in runs.items()}}), flush=True)
        med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
        machine: dict = {}  # the GPU's name, or this CPU's measured matmul FLOP/s

        def side(name: str, out: Path) -> dict:
            if name == "launcher":
                return run_launcher(overrides + args.launcher_set, args.packing or long, long, out, args.nproc)
            return run_hf(overrides, long, out, args.hf_group_by_length, args.nproc, args.baseline == "trl")

        # (tool, its switch, the summary key, what to take from what rank 0 wrote)
        tools = []
        if args.live_memory:
            tools.append(("live_peak", "LIVE_PEAK_DIR", "live_peak_gb", lambda rs: max(r["live_peak_gb"] for r in rs)))
        if args.profile:  # where each side's step goes (bench/step_profile: only rank 0 writes)
            tools.append(("step_profile", "STEP_PROFILE_DIR", "profile", lambda rs: rs[0]))
        for tool, env, key, pick in tools if not args.gpu else []:  # one more untimed run per side each
            for name in ("launcher", "hf"):
                with instrumented(Path(tmp) / f"{tool}_{name}", tool, env) as found:
                    side(name, Path(tmp) / f"{tool}_{name}_run")
                rank0 = [r for r in found if r.get("rank", 0) == 0]
                med[name][key] = pick(rank0) if rank0 else None
        if args.gpu:
            import torch

            for m in med.values():
                m["mfu"] = mfu(m["tokens_per_s"], model)
            machine["gpu"] = torch.cuda.get_device_name(0)
        else:
            machine["matmul_gflops"] = ceiling.measure_again()
            per_token = cpu_utilisation(model, args.seq_len if long else 16, max(ceiling.peaks))
            for m in med.values():
                m["mfu"] = round(m["tokens_per_s"] * per_token, 4)
    ratio = {
        k: round(med["launcher"][k] / med["hf"][k], 3)
        for k in med["hf"]
        if isinstance(med["hf"][k], float | int) and med["hf"][k] and med["launcher"].get(k)
    }
    shape = {"samples": args.samples, "seq_len": args.seq_len} if long else {"steps": args.steps}
    summary = {
        "model": args.model,
        "gpu": args.gpu,
        "nproc": args.nproc,
        "data": args.data,
        **shape,
        "baseline": args.baseline,
        "launcher_set": args.launcher_set,
        "hf_group_by_length": args.hf_group_by_length,
        "packing": args.packing or long,
        "median": med,
        **machine,
        "launcher_over_hf": ratio,
    }
    print(json.dumps(summary, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
