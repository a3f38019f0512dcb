"""Time in the plan: FLOPs per token, the step's compute against its communication, and what
`launcher plan` and `launcher sweep --plan` print (hours and GPU-hours). The calibration against
published throughputs is tests/plan/test_published.py."""

import json
from dataclasses import replace

import pytest
from conftest import run_cli

from launcher.config.tables import GPUS
from launcher.plan import throughput
from launcher.plan.planner import PRESETS, Setup


def test_flops_per_token_is_about_six_per_weight_when_every_layer_recomputes():
    """Forward, recompute and input gradient: 2 + 2 + 2 FLOPs a frozen weight; attention and the head add a few %."""
    arch = PRESETS["llama-65b"]
    f = throughput.flops_per_token(arch, Setup(seq_len=2048))
    assert f / (6 * arch.quantized_params) == pytest.approx(1.05, abs=0.05)
    kept = throughput.flops_per_token(arch, Setup(seq_len=2048, gradient_checkpointing=False))
    assert kept / (4 * arch.quantized_params) == pytest.approx(1.06, abs=0.05)  # no recompute: 4 per weight
    longer = throughput.flops_per_token(arch, Setup(seq_len=8192))
    assert longer > f  # attention grows with the sequence


def test_a_slow_link_makes_sharding_communication_bound_and_a_fast_one_does_not():
    arch, s = PRESETS["llama-2-70b"], Setup(micro_batch=1, seq_len=2048, gpus_per_node=4)
    gpu = GPUS["a100"]
    nvlink = throughput.timing(arch, "fsdp", s, gpu)
    pcie = throughput.timing(arch, "fsdp", s, gpu, link_gbs=2.0)
    assert nvlink.bound == "compute" and pcie.bound == "communication"
    assert pcie.tokens_per_s < nvlink.tokens_per_s
    # DDP moves only the adapter's gradients: the link hardly matters
    ddp = throughput.timing(arch, "ddp", s, gpu, link_gbs=2.0)
    assert ddp.bound == "compute"


def test_more_gpus_more_tokens_and_across_nodes_the_network_counts():
    arch, s = PRESETS["llama-65b"], Setup(micro_batch=2, seq_len=2048, gpus_per_node=8)
    gpu = GPUS["h100"]
    one = throughput.timing(arch, "fsdp", s, gpu)
    two = throughput.timing(arch, "fsdp", replace(s, nodes=2), gpu)
    slow = throughput.timing(arch, "fsdp", replace(s, nodes=2), gpu, network_gbs=3.0)
    assert two.tokens_per_s > one.tokens_per_s > two.tokens_per_s / 2
    assert slow.tokens_per_s < two.tokens_per_s and slow.bound == "communication"
    assert 0 < one.mfu < gpu.matmul_eff  # elementwise work and dequantization take their share


def test_recipe_tokens_are_its_steps_rows():
    s = Setup(micro_batch=2, seq_len=1024, gpus_per_node=4, nodes=2)
    assert throughput.recipe_tokens(100, 4, s) == 100 * 4 * 2 * 1024 * 8
    assert throughput.recipe_tokens(None, 4, s) is None


def test_gpu_names_map_onto_the_table():
    assert throughput.gpu_named("NVIDIA H100 80GB HBM3", 79.1).name == "h100"
    assert throughput.gpu_named("NVIDIA A100-SXM4-40GB", 39.4).name == "a100-40gb"
    assert throughput.gpu_named("NVIDIA GeForce RTX 4090", 23.6).name == "rtx-4090"
    assert throughput.gpu_named("Tesla T4", 15.0) is None


def test_launcher_plan_prints_hours_and_gpu_hours():
    res = run_cli(
        "plan", "--model", "llama-2-70b", "--gpus-per-node", "8", "--gpu-type", "a100", "--tokens", "2B",
        "train.micro_batch_size=2", "data.max_seq_len=2048",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "time on 8 x a100" in out and "2,000,000,000 tokens" in out
    hours = next(line for line in out.splitlines() if line.strip().startswith("hours")).split()[1:]
    gpu_hours = next(line for line in out.splitlines() if line.strip().startswith("GPU-hours")).split()[1:]
    for h, g in zip(hours, gpu_hours):
        if h != "-":
            assert float(g) == pytest.approx(8 * float(h), rel=0.02, abs=0.1)
    res = run_cli("plan", "--model", "llama-7b", "--gpu-type", "h100", "--json", "train.max_steps=100")
    t = json.loads(res.stdout)["time"]
    assert t["gpu_type"] == "h100" and t["tokens"] == 100 * 32 * 32  # the demo recipe's rows: 32 x 32 tokens
    assert t["single"]["tokens_per_s"] > 0 and t["single"]["hours"] > 0


def test_a_bad_token_count_is_one_line():
    res = run_cli("plan", "--tokens", "lots")
    assert res.returncode == 2 and "--tokens" in res.stderr and "Traceback" not in res.stderr


def test_sweep_plan_tables_the_grid_and_submits_nothing(tmp_path):
    res = run_cli(
        "sweep", "model.random_init=true", "slurm.gpus_per_node=8", "data.max_seq_len=2048", "train.micro_batch_size=1",
        "--grid", "model=llama-7b,llama-65b", "--grid", "nodes=1,2", "--plan", "--gpu-type", "h100",
        "--out", tmp_path / "sw",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| model.name=")]
    assert len(rows) == 4 and all("| yes |" in r for r in rows)
    assert "GPU-hours of the points that fit" in res.stdout
    assert not (tmp_path / "sw").exists()


def test_the_time_follows_the_layers_the_auto_budget_keeps():
    """memory_budget_gb=auto keeps the last layers' activations on a GPU: fewer recomputed, more tokens/s
    in the plan's time table; off, every layer recomputes."""
    from launcher.plan import planner, show

    arch, gpu = PRESETS["llama-3-8b"], GPUS["h100"]
    figures = {}
    for budget in ("auto", None):
        s = Setup(micro_batch=2, seq_len=2048, memory_budget_gb=budget, chunked_loss="auto")
        plans = planner.plan_all(arch, s, gpu.memory_gib, 512)
        single = next(p for p in plans if p.strategy == "single")
        figures[budget] = (single.kept_layers, show.times(plans, arch, s, gpu, None, None, None)[1]["single"])
    assert figures["auto"][0] > 0 == figures[None][0]
    assert figures["auto"][1]["tokens_per_s"] > 1.1 * figures[None][1]["tokens_per_s"]
    assert figures["auto"][1]["flops_per_token"] < figures[None][1]["flops_per_token"]
