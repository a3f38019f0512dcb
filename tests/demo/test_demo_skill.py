"""The built-in demo teaches a pretrained base a new skill, and says so: the shipped base
(builtin:tiny-math, made by launcher/demo/pretrain_tiny.py) knows addition and not subtraction; a short
fine-tune raises held-out subtraction accuracy; eval_accuracy is logged, summarised and printed;
greedy answers through the training forward match `generate`; the console carries no third-party noise."""

import json
import re

import pytest
import torch
from conftest import run_cli

from launcher.config.recipe import load_recipe
from launcher.demo import builtin, pretrain_tiny
from launcher.run import answers
from launcher.run.model import load_base_model, load_tokenizer, resolve_source


def _prompts(tok, rows):
    return [
        {"input_ids": p + a, "prompt_len": len(p)}
        for p, a in (
            (
                [tok.bos_token_id] + tok(r["prompt"], add_special_tokens=False)["input_ids"],
                tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
            )
            for r in rows
        )
    ]


def _accuracy(model, tok, rows) -> float:
    items = _prompts(tok, rows)
    right = 0
    for start in range(0, len(items), 50):
        chunk = items[start : start + 50]
        outs = answers.greedy(
            model, [e["input_ids"][: e["prompt_len"]] for e in chunk], tok.pad_token_id, tok.eos_token_id, 4, "cpu"
        )
        right += sum(tok.decode(o).strip() == r["completion"] for o, r in zip(outs, rows[start : start + 50]))
    return right / len(rows)


@pytest.fixture(scope="module")
def base():
    recipe = load_recipe()
    source = resolve_source(recipe.model)
    return load_base_model(source, recipe.model, recipe.quant).eval(), load_tokenizer(source, recipe.model)


def test_the_shipped_base_knows_addition_and_not_subtraction(base):
    model, tok = base
    assert _accuracy(model, tok, builtin.make_arithmetic(n=200, seed=7)) >= 0.95  # measured 1.00 (NF4)
    assert _accuracy(model, tok, builtin.make_subtraction(n=200, seed=7)) <= 0.10  # measured 0.015


def test_greedy_answers_match_generate_with_left_padding(base):
    """answers.greedy (no KV cache, left-padded batch, positions from the mask) == transformers' generate."""
    model, tok = base
    rows = [{"prompt": p, "completion": ""} for p in ("3+4=", "99+99=", "12+34=", "7+80=")]
    prompts = [e["input_ids"][: e["prompt_len"]] for e in _prompts(tok, rows)]
    ours = answers.greedy(model, prompts, tok.pad_token_id, tok.eos_token_id, 5, "cpu")
    for p, mine in zip(prompts, ours):
        ids = torch.tensor([p])
        ref = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )[0, len(p) :].tolist()
        assert mine == [t for t in ref if t not in (tok.eos_token_id, tok.pad_token_id)]
    assert [tok.decode(o) for o in ours] == ["7", "198", "46", "87"]


def test_pretrain_script_writes_a_base_the_launcher_loads(tmp_path):
    out = pretrain_tiny.pretrain(tmp_path / "base", steps=5, log_every=0)
    res = run_cli(
        "train",
        f"model.name={out}",
        "train.max_steps=2",
        "train.warmup_steps=0",
        "train.eval_every=2",
        "train.eval_accuracy_samples=4",
        f"train.output_dir={tmp_path / 'run'}",
    )
    assert res.returncode == 0, res.stderr[-2000:]


THIRD_PARTY_NOISE = re.compile(
    r"Warning|warnings\.warn|kernels-community|Setting accelerator|Loading weights|Paged optimizers|deprecated",
)


def test_a_short_demo_rises_in_accuracy_and_prints_a_clean_console(tmp_path):
    """The demo recipe cut to 300 steps (the full demo: 1,500 steps, 0% -> 99%, README)."""
    run = tmp_path / "demo"
    res = run_cli(
        "train", "train.max_steps=300", "train.eval_every=300", "train.save_every=300", f"train.output_dir={run}"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["first_eval_accuracy"] <= 0.10  # measured 0.0
    assert summary["eval_accuracy"] >= 0.70, summary  # measured 0.855 at 300 steps (0.94 at 400)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 300]
    out = res.stdout + res.stderr
    noise = [line for line in out.splitlines() if THIRD_PARTY_NOISE.search(line)]
    assert not noise, noise
    tail = res.stdout.strip().splitlines()[-8:]
    assert tail[0].startswith("done: 300 steps")
    assert re.fullmatch(r"  eval accuracy  0\.0% -> \d+\.\d% \(exact match, 200 held-out prompts\)", tail[2]), tail
    assert tail[3].startswith("  for example    '") and tail[-2].startswith(f"  launcher generate {run} --prompt ")
    gen = run_cli("generate", run, "--prompt", summary["eval_example"]["prompt"], "--max-new-tokens", "4")
    assert gen.returncode == 0 and not THIRD_PARTY_NOISE.search(gen.stderr), gen.stderr[-2000:]
    assert gen.stdout.strip() == summary["eval_example"]["prompt"] + summary["eval_example"]["answer"]


def test_quiet_prints_only_the_result_and_verbose_adds_the_data_statistics(tmp_path):
    common = ["train.max_steps=2", "train.warmup_steps=0", "train.eval_every=2", "data.max_samples=200"]
    quiet = run_cli("train", "--quiet", *common, f"train.output_dir={tmp_path / 'q'}")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stdout.startswith("done: 2 steps") and "train:" not in quiet.stderr and not quiet.stderr.strip()
    loud = run_cli("train", "-v", *common, f"train.output_dir={tmp_path / 'v'}")
    assert loud.returncode == 0 and 'data: {"format": "prompt_completion"' in loud.stdout, loud.stderr[-2000:]


def test_eval_accuracy_is_documented_in_fields():
    res = run_cli("fields")
    assert "train.eval_accuracy_samples" in res.stdout and "exact match" in res.stdout


def test_a_single_process_run_never_imports_deepspeed(tmp_path):
    """Not just its console line (DS_ACCELERATOR would hide that): the module itself stays unloaded."""
    import subprocess
    import sys

    code = (
        "import sys; from launcher.cli import main; "
        f"rc = main(['train', '-q', 'train.max_steps=2', 'train.warmup_steps=0', 'train.eval_every=2', "
        f"'data.max_samples=200', 'train.output_dir={tmp_path / 'run'}']); "
        "print('deepspeed loaded:', 'deepspeed' in sys.modules); sys.exit(rc)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "deepspeed loaded: False" in res.stdout, res.stdout
