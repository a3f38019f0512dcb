"""Architectures users bring, beyond Llama: a packed LoRA run on a small random config of each trains,
reports eval_accuracy, and its adapter reloads in plain peft onto the same 4-bit base with the
in-memory model's logits. One process trains them all (tests/helpers/train_archs.py)."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "helpers"))
from train_archs import ARCHS, PROBE  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("archs")
    res = subprocess.run(
        [sys.executable, str(ROOT / "tests/helpers/train_archs.py"), str(out), *ARCHS],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.stdout + res.stderr


def _plain_peft(model_dir, run_dir, attn: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.uint8,
    )
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=q, dtype=torch.float32, attn_implementation=attn
    )
    model = PeftModel.from_pretrained(base, run_dir).eval()
    for m in model.modules():  # the launcher keeps bitsandbytes' training format on AVX512-BF16 CPUs
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture_trains_packed_and_reloads_in_plain_peft(trained, arch):
    out, _ = trained
    where = out / arch
    assert not (where / "error.txt").exists(), (where / "error.txt").read_text()[-3000:]
    summary = json.loads((where / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and 0.0 <= summary["eval_accuracy"] <= 1.0
    rows = [json.loads(line) for line in (where / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 4]
    model = _plain_peft(where / "model", where / "run", "eager" if arch == "gemma2" else "sdpa")
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    trained_logits = torch.load(where / "probe.pt")
    assert torch.allclose(logits, trained_logits, atol=1e-4), (logits - trained_logits).abs().max()
    with torch.no_grad(), model.disable_adapter():  # the adapter did something
        assert not torch.allclose(model(input_ids=PROBE).logits, trained_logits, atol=1e-4)


def test_architecture_without_sdpa_falls_back_to_eager_in_one_line(trained):
    _, output = trained
    notes = [line for line in output.splitlines() if "has no SDPA attention" in line]
    assert notes == ["note: Gemma2ForCausalLM has no SDPA attention; using eager (model.attn_implementation=eager)"]


def test_an_explicit_unsupported_attention_is_refused_naming_the_field(trained, capsys):
    from launcher import cli

    out, _ = trained
    code = cli.main(
        [
            "train",
            f"model.name={out / 'gemma2' / 'model'}",
            "model.attn_implementation=sdpa",
            "train.max_steps=2",
            "train.warmup_steps=0",
            f"train.output_dir={out / 'refused'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == (
        "error: model.attn_implementation: Gemma2ForCausalLM does not support sdpa; use eager"
    ), err
