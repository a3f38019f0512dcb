"""Placement: the strategy resolver, device_map, every refusal (message + exit code), and the check
that a process was launched with the recipe's strategy. (Configs: test_launch_configs.py; FSDP2 wrapping:
test_sharding.py; the Placement value per strategy: test_placement_value.py.)"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from launcher.config.recipe import load_recipe
from launcher.run import placement

GPU8 = placement.Machine(gpus=8, gpu_memory_gb=80)
CPU = placement.Machine(0)
TINY = {"hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "vocab_size": 64, "num_attention_heads": 4}
LLAMA_70B = {
    "hidden_size": 8192,
    "num_hidden_layers": 80,
    "intermediate_size": 28672,
    "vocab_size": 32000,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}


def problems(*overrides, machine=GPU8, cfg=TINY):
    r = load_recipe(None, list(overrides))
    return placement.placement_problems(r, placement.resolve_strategy(r, machine, cfg), machine, cfg)


def test_auto_strategy_uses_gpu_count_and_model_size():
    assert placement.resolve_strategy(load_recipe(None, []), GPU8, TINY) == "single"
    two = load_recipe(None, ["dist.nproc=2"])
    assert placement.resolve_strategy(two, GPU8, TINY) == "ddp"
    assert placement.resolve_strategy(two, placement.Machine(2, 24), LLAMA_70B) == "fsdp"  # 4-bit 70B > 24 GB
    assert placement.resolve_strategy(two, CPU, LLAMA_70B) == "ddp"
    from launcher.plan.planner import Arch

    assert 6.5e10 < Arch.from_config(LLAMA_70B).params < 7.2e10


def test_device_map_per_strategy():
    cuda1 = torch.device("cuda", 1)
    assert placement.device_map_for("single", None, cuda1) == "auto"
    assert placement.device_map_for("ddp", None, cuda1) == {"": cuda1}
    assert placement.device_map_for("zero2", None, cuda1) == {"": cuda1}
    for s in ("zero3", "zero3_offload", "fsdp", "fsdp_offload"):
        assert placement.device_map_for(s, None, cuda1) is None
        assert not placement.kbit_upcast(s)
    assert placement.device_map_for("ddp", None, torch.device("cpu")) is None
    assert placement.kbit_upcast("ddp") and placement.kbit_upcast("zero2")


def test_storage_dtype_follows_sharding():
    r = load_recipe(None, [])
    assert placement.storage_dtype(r, "ddp", torch.bfloat16) == torch.uint8
    assert placement.storage_dtype(r, "fsdp", torch.bfloat16) == torch.bfloat16
    assert placement.storage_dtype(r, "zero3", torch.float32) == torch.float32


@pytest.mark.parametrize(
    "overrides,machine,cfg,needle",
    [
        (
            ["dist.strategy=zero3", "dist.nproc=2", "model.device_map=auto"],
            GPU8,
            TINY,
            "model.device_map: must be unset",
        ),
        (
            ["dist.strategy=fsdp", "dist.nproc=2", "model.device_map={'': 0}"],
            GPU8,
            TINY,
            "model.device_map: must be unset",
        ),
        (["dist.strategy=ddp", "dist.nproc=2", "model.device_map=auto"], GPU8, TINY, "silently collapses"),
        (
            ["dist.strategy=ddp", "dist.nproc=4"],
            placement.Machine(2, 80),
            TINY,
            "dist.nproc: 4 processes per node but this node has 2",
        ),
        (["dist.strategy=fsdp", "dist.nproc=2"], CPU, TINY, "needs GPUs"),
        (
            ["dist.strategy=zero3", "dist.nproc=2"],
            GPU8,
            {**TINY, "quantization_config": {"quant_method": "gptq"}},
            "pre-quantized GPTQ",
        ),
        (
            ["dist.strategy=fsdp", "dist.nproc=2"],
            GPU8,
            {**TINY, "quantization_config": {"quant_method": "awq"}},
            "pre-quantized AWQ",
        ),
        (["dist.strategy=zero3", "dist.nproc=2", "quant.mode=int8"], GPU8, TINY, "quant.mode: int8"),
        (["dist.strategy=fsdp", "dist.nproc=2", "quant.storage_dtype=uint8"], GPU8, TINY, "quant.storage_dtype: uint8"),
        (
            ["dist.strategy=fsdp", "dist.nproc=2", "quant.storage_dtype=float16", "model.dtype=bfloat16"],
            GPU8,
            TINY,
            "must equal model.dtype",
        ),
        (["dist.strategy=fsdp", "dist.nproc=2", "peft.method=prompt_tuning"], GPU8, TINY, "peft.method: prompt_tuning"),
    ],
)
def test_refusals_name_the_field(overrides, machine, cfg, needle):
    found = problems(*overrides, machine=machine, cfg=cfg)
    assert any(needle in p for p in found), found


def test_valid_combinations_pass():
    for s in ("ddp", "zero2", "zero3", "zero3_offload", "fsdp", "fsdp_offload"):
        assert problems(f"dist.strategy={s}", "dist.nproc=8") == []
    assert problems("dist.strategy=zero2", "dist.nproc=2", "quant.mode=int8") == []


def test_optimizer_substitution():
    with pytest.warns(UserWarning, match="cannot live on the CPU under zero3_offload"):
        assert placement.optimizer_for("zero3_offload", "paged_adamw_8bit") == "adamw_torch"
    with pytest.warns(UserWarning, match="DTensor"):
        assert placement.optimizer_for("fsdp", "paged_adamw_32bit", fsdp_version=2) == "adamw_torch"
    assert placement.optimizer_for("fsdp", "adamw_8bit", fsdp_version=1) == "adamw_8bit"
    assert placement.optimizer_for("zero3", "paged_adamw_32bit") == "paged_adamw_32bit"
    assert placement.optimizer_for("ddp", "paged_adamw_8bit") == "paged_adamw_8bit"


def test_double_checkpointing_is_refused():
    from launcher.config.errors import UserError

    with pytest.raises(UserError, match="train.gradient_checkpointing: .*fsdp_activation_checkpointing"):
        placement.check_checkpointing(True, True)
    placement.check_checkpointing(True, False)
    placement.check_checkpointing(False, True)


# ---------------------------------------------------------------- refusals through the CLI


def _fake_gptq_model(tmp_path: Path) -> Path:
    from launcher.demo.builtin import ensure_tiny_llama

    src = ensure_tiny_llama()
    dst = tmp_path / "gptq-model"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    "args,needle",
    [
        (["dist.strategy=zero3", "dist.nproc=2", "model.device_map=auto"], "model.device_map: must be unset"),
        (["dist.strategy=ddp", "dist.nproc=2", "model.device_map=auto"], "silently collapses"),
        (["dist.strategy=fsdp", "dist.nproc=2"], "needs GPUs"),
        (["dist.strategy=zero3", "dist.nproc=2", "quant.mode=int8"], "quant.mode: int8"),
        (["dist.strategy=single", "dist.nproc=2"], "dist.strategy: single runs one process"),
        (["dist.strategy=zero3", "dist.nproc=2", "GPTQ"], "pre-quantized GPTQ"),
    ],
)
def test_cli_refuses_before_loading(args, needle, tmp_path):
    if "GPTQ" in args:
        args = [a for a in args if a != "GPTQ"] + [f"model.name={_fake_gptq_model(tmp_path)}"]
    out = tmp_path / "run"
    res = run_cli("train", *args, f"train.output_dir={out}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()  # nothing written, nothing spawned


def test_strategy_must_match_the_launch(tmp_path):
    """A zero3 recipe started as one plain process (no DeepSpeed config) is refused, not run as DDP."""
    res = run_cli("dist.strategy=zero3", f"train.output_dir={tmp_path / 'r'}", module="launcher.train")
    assert res.returncode == 2
    assert "the recipe says zero3 but this process was launched as a single process" in res.stderr


# ---------------------------------------------------------------- generated configs


# ---------------------------------------------------------------- FSDP2 on CPU


def test_memory_budget_decides_the_kept_layers_once():
    """train.memory_budget_gb becomes Placement.kept_layers: the planner's choice for this strategy and
    machine (70B on 8 GPUs: a budget between full recompute and none keeps some of the 80 layers)."""
    from launcher.plan import planner

    def kept(*overrides, gpu=True):
        r = load_recipe(None, ["data.max_seq_len=2048", "train.micro_batch_size=4", *overrides])
        machine = placement.Machine(8, 80.0) if gpu else placement.Machine(0)
        return placement.memory_choices(r, "fsdp", LLAMA_70B, machine)["kept_layers"]

    assert kept("train.memory_budget_gb=null") == 0  # no budget: checkpoint_every decides
    assert kept() > 0 and kept(gpu=False) == 1  # auto: 85% of a GPU's memory; on CPU the free last layer
    arch = planner.Arch.from_config(LLAMA_70B)
    s = planner.Setup(micro_batch=4, seq_len=2048, lora_r=16, gpus_per_node=1)
    low = planner.estimate(arch, "fsdp", s).device_total
    high = planner.estimate(arch, "fsdp", planner.Setup(**{**s.__dict__, "kept_layers": 80})).device_total
    middle = kept(f"train.memory_budget_gb={(low + high) / 2:.2f}")
    assert 0 < middle < 80
    assert kept(f"train.memory_budget_gb={high + 1:.2f}") == 80
    assert kept(f"train.memory_budget_gb={low - 1:.2f}") == 0


def test_a_run_with_a_memory_budget_says_what_it_kept(tmp_path):
    out = tmp_path / "run"
    res = run_cli(
        "train",
        "train.max_steps=2",
        "train.warmup_steps=0",
        "train.eval_every=2",
        "train.save_every=2",
        "train.eval_accuracy_samples=0",
        "train.memory_budget_gb=100",
        f"train.output_dir={out}",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "the last 4 decoder layer(s) keep their activations" in res.stdout + res.stderr


def test_a_budget_beyond_the_gpu_is_refused():
    assert any(
        "train.memory_budget_gb: 90 GB is more than this GPU's 80.0 GB" in p
        for p in problems("train.memory_budget_gb=90")
    )
    assert not problems("train.memory_budget_gb=70")


def test_auto_memory_settings_are_decided_once_and_a_set_value_is_kept():
    """train.memory_budget_gb and train.chunked_loss default to auto: on a GPU the budget is 85% of its
    memory (on CPU what recomputing every layer needs), and the loss is chunked where the planner finds
    the logits a large share of the peak and the strategy allows it; a value the user sets is taken as it
    is, null and 0 included."""
    from launcher.plan import random_model
    from launcher.plan.source import model_config
    from launcher.run.train import memory_lines

    cfg = model_config(str(random_model.preset_dir("llama-3-8b")))  # a 128k vocabulary
    base = ["model.name=llama-3-8b", "model.random_init=true", "data.max_seq_len=2048", "train.micro_batch_size=2"]
    gpu, cpu = placement.Machine(1, 79.1), placement.Machine(0)

    def choose(strategy, machine, *overrides):
        return placement.memory_choices(load_recipe(None, [*base, *overrides]), strategy, cfg, machine)

    on_gpu = choose("single", gpu)
    assert on_gpu["memory_budget_gb"] == pytest.approx(0.85 * 79.1) and 0 < on_gpu["kept_layers"] < 32
    assert on_gpu["chunked_loss"] == 4096 // 8
    assert choose("fsdp", gpu)["chunked_loss"] == 0  # refused where parameters are sharded
    on_cpu = choose("single", cpu)  # auto: what recomputing every layer needs, which the last layer fits in
    whole = choose("single", cpu, "train.memory_budget_gb=null")
    assert whole == {"kept_layers": 0, "chunked_loss": 512, "memory_budget_gb": None}
    assert on_cpu["kept_layers"] == 1 and on_cpu["chunked_loss"] == 512 and on_cpu["memory_budget_gb"] > 0
    assert choose("single", gpu, "train.memory_budget_gb=null", "train.chunked_loss=0") == {
        "kept_layers": 0, "chunked_loss": 0, "memory_budget_gb": None,
    }  # fmt: skip
    assert choose("single", gpu, "train.chunked_loss=64")["chunked_loss"] == 64
    assert choose("single", gpu, "train.memory_budget_gb=20")["memory_budget_gb"] == 20.0
    demo = load_recipe(None, [])  # the built-in demo: a 54-token vocabulary, nothing to chunk
    assert placement.memory_choices(demo, "single", model_config(str(builtin_model(demo))), cpu)["chunked_loss"] == 0
    # what the run says it chose, one line each
    recipe = load_recipe(None, base)
    pl = placement.Placement("single", 0, 1, 0, 0, False, False, None, None, None, True, "adamw_torch", **on_gpu)
    lines = memory_lines(recipe, pl, gpu=True)
    assert len(lines) == 2 and "auto: 85% of this GPU's memory" in lines[0] and "auto: 512 tokens a chunk" in lines[1]


def builtin_model(recipe):
    from launcher.plan.source import resolve_source

    return resolve_source(recipe.model)
