"""2-process QLoRA runs on CPU (gloo) for ddp, zero2 and zero3, launched the way a user would:
`accelerate launch --config_file <generated config> -m launcher.train ...`."""

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

COMMON = [
    "dist.nproc=2",
    "train.max_steps=6",
    "train.warmup_steps=0",
    "data.max_samples=400",
    "train.eval_every=3",
    "train.save_every=3",
    "data.log_sample_ids=true",
    "train.micro_batch_size=16",
]
_runs: dict = {}


def _launch(strategy: str, tmp_path_factory) -> tuple:
    """Run once per strategy per session; returns (run_dir, completed process)."""
    if strategy not in _runs:
        base = tmp_path_factory.mktemp(strategy)
        res = run_cli("configs", f"dist.strategy={strategy}", "dist.nproc=2", "--out", base)
        assert res.returncode == 0, res.stderr
        run = base / "run"
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(base / "accelerate_configs" / f"{strategy}.yaml"),
            "--main_process_port",
            "0",
            "-m",
            "launcher.train",
            f"dist.strategy={strategy}",
            f"train.output_dir={run}",
            *COMMON,
        ]
        _runs[strategy] = (run, subprocess.run(cmd, capture_output=True, text=True, timeout=600))
    return _runs[strategy]


def _rank_logs(run):
    logs = {}
    for r in (0, 1):
        rows = [json.loads(line) for line in (run / "sample_ids" / f"rank{r}.jsonl").read_text().splitlines()]
        logs[r] = rows
    return logs


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_two_ranks_train_in_step(strategy, tmp_path_factory):
    run, res = _launch(strategy, tmp_path_factory)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["strategy"] == strategy and summary["steps"] == 6
    # eval_accuracy (the demo's 200 prompts, split over the ranks, the same number of forwards on each)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 3, 6]
    assert 0.0 <= summary["eval_accuracy"] <= 1.0 and summary["first_eval_accuracy"] <= 0.1
    logs = _rank_logs(run)
    ids = {r: [i for row in rows[:-1] for i in row["ids"]] for r, rows in logs.items()}
    assert len(ids[0]) == len(ids[1]) == 6 * 16  # same number of batches on each rank
    assert not set(ids[0]) & set(ids[1])  # each rank sees different samples
    assert len(set(ids[0])) == len(ids[0])  # and none twice within the epoch
    # after the steps every rank holds the same adapter (gathered under ZeRO-3)
    assert logs[0][-1]["adapter_sha256"] == logs[1][-1]["adapter_sha256"]
    # the launch really was this strategy, and checkpoints are complete
    ckpt = run / "checkpoints" / "step_0000006"
    assert (ckpt / "COMPLETE").exists()
    assert (ckpt / "zero_to_fp32.py").exists() == strategy.startswith("zero")  # DeepSpeed wrote it


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_sharded_adapter_matches_ddp(strategy, tmp_path_factory):
    """Same recipe and seed: the saved adapter is complete and equals DDP's within 1e-4."""
    ddp_run, ddp_res = _launch("ddp", tmp_path_factory)
    run, res = _launch(strategy, tmp_path_factory)
    assert ddp_res.returncode == 0 and res.returncode == 0, res.stderr[-3000:]
    ref, got = load_file(ddp_run / "adapter_model.safetensors"), load_file(run / "adapter_model.safetensors")
    assert got.keys() == ref.keys() and len(got) == 56  # 7 linear kinds x 4 layers x (A, B)
    assert all(t.numel() > 0 for t in got.values())  # not the empty ZeRO-3 adapter
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-4, rtol=1e-3)
    accuracy = [json.loads((r / "summary.json").read_text())["eval_accuracy"] for r in (ddp_run, run)]
    assert abs(accuracy[0] - accuracy[1]) <= 0.02, accuracy  # the same answers, gathered shards or not


def test_zero3_adapter_loads_with_plain_peft(tmp_path_factory):
    run, res = _launch("zero3", tmp_path_factory)
    assert res.returncode == 0, res.stderr[-3000:]
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            f"""
import json, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
from safetensors.torch import load_file
from launcher.config.recipe import load_recipe
from launcher.run.model import resolve_source
r = load_recipe({str(run / "recipe.yaml")!r})
base = AutoModelForCausalLM.from_pretrained(resolve_source(r.model), dtype=torch.float32)
m = PeftModel.from_pretrained(base, {str(run)!r})
saved = load_file({str(run / "adapter_model.safetensors")!r})
state = {{k: v for k, v in m.state_dict().items() if 'lora_' in k}}
assert len(state) == len(saved), (len(state), len(saved))
b = [v for k, v in state.items() if 'lora_B' in k]
print(json.dumps({{"n": len(state), "nonzero_B": sum(int(t.abs().sum() > 0) for t in b), "n_B": len(b)}}))
""",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    out = json.loads(probe.stdout.strip().splitlines()[-1])
    assert out["n"] == 56 and out["nonzero_B"] == out["n_B"]  # lora_B starts at 0: every one trained


# What a third-party line looks like: a Python warning, a glog/torchrun log line, a deprecation.
THIRD_PARTY = re.compile(r"Warning|warnings\.warn|^[IWE]\d{4} |deprecated|return func\(\*args")


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_launcher_train_spawns_the_generated_config_with_a_clean_console(strategy, tmp_path):
    """`launcher train` with 2 processes runs the generated config, and at the default level its console
    holds the launcher's own lines only (a 2-process ZeRO-3 run once printed 23,000 FutureWarnings)."""
    run = tmp_path / strategy
    res = run_cli("train", f"dist.strategy={strategy}", f"train.output_dir={run}", *COMMON)
    assert res.returncode == 0, res.stderr[-3000:]
    launched = res.stdout.splitlines()[0]
    assert "--config_file" in launched and str(run / f"launch/accelerate_configs/{strategy}.yaml") in launched
    assert (run / f"launch/ds_configs/{strategy}.json").exists() == (strategy != "ddp")
    assert json.loads((run / "summary.json").read_text())["strategy"] == strategy
    noise = [line for line in (res.stdout + res.stderr).splitlines() if THIRD_PARTY.search(line)]
    assert noise == [], noise[:10]


def test_packed_ddp_epoch_sees_every_sample_once(tmp_path):
    """2 ranks, packing, remainder=pad, one epoch: the union of what the ranks trained on is the
    whole dataset, each sample once, and both ranks ran the same number of steps."""
    run = tmp_path / "packed"
    res = run_cli(
        "train",
        "dist.nproc=2",
        f"train.output_dir={run}",
        "data.max_samples=203",
        "data.eval_fraction=0",
        "data.packing=true",
        "data.remainder=pad",
        "train.epochs=1",
        "train.max_steps=null",
        "train.micro_batch_size=8",
        "train.warmup_steps=0",
        "data.log_sample_ids=true",
        "train.save_every=1000",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    logs = _rank_logs(run)
    ids = [i for r in (0, 1) for row in logs[r][:-1] for i in row["ids"]]
    assert sorted(ids) == list(range(203))
    assert len(logs[0]) == len(logs[1])  # same number of micro batches on both ranks
    assert logs[0][-1]["adapter_sha256"] == logs[1][-1]["adapter_sha256"]
