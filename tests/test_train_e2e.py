"""End-to-end on CPU: the default run learns, its adapter loads with plain peft, generate and merge work."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

STEPS = 200
PLAIN_PEFT_LOGITS = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from peft import PeftModel, PeftConfig
run, out = sys.argv[1], sys.argv[2]
base_dir = PeftConfig.from_pretrained(run).base_model_name_or_path
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.float32)
base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=q, dtype=torch.float32)
model = PeftModel.from_pretrained(base, run).eval()
# The launcher keeps bitsandbytes' training format on AVX512-BF16 CPUs: compare like with like.
for m in model.modules():
    if hasattr(m, "support_avx512bf16_for_cpu"):
        m.support_avx512bf16_for_cpu = False
probe = torch.tensor([[1, 5, 6, 14, 7, 8, 17], [1, 9, 9, 14, 9, 9, 17]])
with torch.no_grad():
    torch.save(model(input_ids=probe).logits, out)
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    run_dir = tmp / "run"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests/helpers/train_and_probe.py"),
            str(tmp / "probe.pt"),
            f"train.output_dir={run_dir}",
            f"train.max_steps={STEPS}",
            "train.eval_every=100",
            "train.save_every=100",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir, torch.load(tmp / "probe.pt")


def test_default_run_learns(run):
    run_dir, _ = run
    summary = json.loads((run_dir / "summary.json").read_text())
    # Random-weight base: eval loss starts near ln(vocab)=4.1 and the adapter alone must bring it down.
    assert summary["first_eval_loss"] > 3.8
    assert summary["eval_loss"] < 2.9, summary
    assert summary["steps"] == STEPS and summary["processes"] == 1


def test_run_dir_contents(run):
    run_dir, _ = run
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "recipe.yaml",
        "metrics.jsonl",
        "loss.png",
        "summary.json",
    ):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints/step_0000200/COMPLETE").exists()
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents*"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gb"} <= set(train_rows[0])
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 100, 200]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0 for r in train_rows)


def test_checkpoint_holds_only_the_adapter(run):
    from safetensors.torch import load_file

    run_dir, _ = run
    ckpt = load_file(run_dir / "checkpoints/step_0000200/model.safetensors")
    assert ckpt and all("lora_" in k for k in ckpt)


def test_plain_peft_in_fresh_process_gives_same_logits(run, tmp_path):
    run_dir, in_memory = run
    res = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT_LOGITS, str(run_dir), str(tmp_path / "l.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "l.pt"), in_memory, atol=1e-5, rtol=1e-5)


def test_generate(run):
    run_dir, _ = run
    # Prompts of the taught task: after 200 steps of subtraction, an addition prompt may already answer
    # nothing (the demo's forgetting: "12+34=" ends at once), so it says nothing about generate.
    res = run_cli("generate", run_dir, "--prompt", "75-38=", "--prompt", "50-7=", "--max-new-tokens", "4")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("75-38=") and lines[1].startswith("50-7=")
    assert any(ch.isdigit() for ch in lines[0][len("75-38=") :])


def test_generate_caps_new_tokens_at_the_models_context(run):
    """--max-new-tokens far past the context ends at the context, saying so (it ran past 120 s)."""
    run_dir, _ = run
    res = run_cli("generate", run_dir, "--prompt", "75-38=", "--max-new-tokens", "10000000", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--max-new-tokens 10000000 capped at" in res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith("75-38=")


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-4), ("bfloat16", 0.15)])
def test_merge_matches_base_plus_adapter(run, tmp_path, dtype, atol):
    """float32 is exact up to rounding; bfloat16 storage rounds weights to 8 bits of mantissa."""
    from transformers import AutoModelForCausalLM

    run_dir, in_memory = run
    res = run_cli("merge", run_dir, tmp_path / "merged", "--dtype", dtype)
    assert res.returncode == 0, res.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not hasattr(merged.config, "quantization_config")
    probe = torch.tensor([[1, 5, 6, 14, 7, 8, 17], [1, 9, 9, 14, 9, 9, 17]])
    with torch.no_grad():
        logits = merged(input_ids=probe).logits
    assert (logits - in_memory).abs().max().item() < atol
    assert (logits.argmax(-1) == in_memory.argmax(-1)).float().mean() > 0.9


def test_existing_run_is_not_overwritten(run):
    run_dir, _ = run
    before = (run_dir / "adapter_model.safetensors").read_bytes()
    res = run_cli("train", f"train.output_dir={run_dir}", "train.max_steps=30")
    assert res.returncode == 2 and "--resume" in res.stderr
    assert (run_dir / "adapter_model.safetensors").read_bytes() == before


def test_merge_refuses_non_run_dir(tmp_path):
    res = run_cli("merge", tmp_path, tmp_path / "out")
    assert res.returncode == 2 and "not a finished run directory" in res.stderr
