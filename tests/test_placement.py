"""Placement: the strategy resolver, device_map, every refusal (message + exit code),
the generated configs (regenerated and read back by accelerate's and DeepSpeed's loaders),
and the project's FSDP2 wrapping of a 4-bit LoRA model under torch's fully_shard on CPU."""

import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli
from launcher import placement
from launcher.recipe import load_recipe

GPU8 = placement.Machine(gpus=8, gpu_memory_gb=80)
CPU = placement.Machine(0)
TINY = {"hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "vocab_size": 64,
        "num_attention_heads": 4}
LLAMA_70B = {"hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672, "vocab_size": 32000,
             "num_attention_heads": 64, "num_key_value_heads": 8}


def problems(*overrides, machine=GPU8, cfg=TINY):
    r = load_recipe(None, list(overrides))
    return placement.placement_problems(r, placement.resolve_strategy(r, machine, cfg), machine, cfg)


def test_auto_strategy_uses_gpu_count_and_model_size():
    assert placement.resolve_strategy(load_recipe(None, []), GPU8, TINY) == "single"
    two = load_recipe(None, ["dist.nproc=2"])
    assert placement.resolve_strategy(two, GPU8, TINY) == "ddp"
    assert placement.resolve_strategy(two, placement.Machine(2, 24), LLAMA_70B) == "fsdp"  # 4-bit 70B > 24 GB
    assert placement.resolve_strategy(two, CPU, LLAMA_70B) == "ddp"
    from launcher.planner import Arch

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


@pytest.mark.parametrize("overrides,machine,cfg,needle", [
    (["dist.strategy=zero3", "dist.nproc=2", "model.device_map=auto"], GPU8, TINY, "model.device_map: must be unset"),
    (["dist.strategy=fsdp", "dist.nproc=2", "model.device_map={'': 0}"], GPU8, TINY, "model.device_map: must be unset"),
    (["dist.strategy=ddp", "dist.nproc=2", "model.device_map=auto"], GPU8, TINY, "silently collapses"),
    (["dist.strategy=ddp", "dist.nproc=4"], placement.Machine(2, 80), TINY, "dist.nproc: 4 processes per node but this node has 2"),
    (["dist.strategy=fsdp", "dist.nproc=2"], CPU, TINY, "needs GPUs"),
    (["dist.strategy=zero3", "dist.nproc=2"], GPU8, {**TINY, "quantization_config": {"quant_method": "gptq"}}, "pre-quantized GPTQ"),
    (["dist.strategy=fsdp", "dist.nproc=2"], GPU8, {**TINY, "quantization_config": {"quant_method": "awq"}}, "pre-quantized AWQ"),
    (["dist.strategy=zero3", "dist.nproc=2", "quant.mode=int8"], GPU8, TINY, "quant.mode: int8"),
    (["dist.strategy=fsdp", "dist.nproc=2", "quant.storage_dtype=uint8"], GPU8, TINY, "quant.storage_dtype: uint8"),
    (["dist.strategy=fsdp", "dist.nproc=2", "quant.storage_dtype=float16", "model.dtype=bfloat16"], GPU8, TINY,
     "must equal model.dtype"),
    (["dist.strategy=fsdp", "dist.nproc=2", "peft.method=prompt_tuning"], GPU8, TINY, "peft.method: prompt_tuning"),
])
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
    from launcher.errors import UserError

    with pytest.raises(UserError, match="train.gradient_checkpointing: .*fsdp_activation_checkpointing"):
        placement.check_checkpointing(True, True)
    placement.check_checkpointing(True, False)
    placement.check_checkpointing(False, True)


# ---------------------------------------------------------------- refusals through the CLI


def _fake_gptq_model(tmp_path: Path) -> Path:
    from launcher.builtin import ensure_tiny_llama

    src = ensure_tiny_llama()
    dst = tmp_path / "gptq-model"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("args,needle", [
    (["dist.strategy=zero3", "dist.nproc=2", "model.device_map=auto"], "model.device_map: must be unset"),
    (["dist.strategy=ddp", "dist.nproc=2", "model.device_map=auto"], "silently collapses"),
    (["dist.strategy=fsdp", "dist.nproc=2"], "needs GPUs"),
    (["dist.strategy=zero3", "dist.nproc=2", "quant.mode=int8"], "quant.mode: int8"),
    (["dist.strategy=single", "dist.nproc=2"], "dist.strategy: single runs one process"),
    (["dist.strategy=zero3", "dist.nproc=2", "GPTQ"], "pre-quantized GPTQ"),
])
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


def test_committed_configs_are_regenerated_exactly(tmp_path):
    env_bin = str(Path(sys.executable).parent)
    res = subprocess.run(["bash", "accelerate_configs/regenerate.sh", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**__import__("os").environ, "PATH": env_bin + ":/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    for sub in ("accelerate_configs", "ds_configs"):
        committed = sorted(p.name for p in (ROOT / sub).iterdir() if p.suffix in (".yaml", ".json"))
        fresh = sorted(p.name for p in (tmp_path / sub).iterdir())
        assert committed == fresh
        _, mismatch, errors = filecmp.cmpfiles(ROOT / sub, tmp_path / sub, committed, shallow=False)
        # DeepSpeed paths inside the YAML differ by the output directory only
        for name in mismatch:
            a = (ROOT / sub / name).read_text().replace("ds_configs/", str(tmp_path / "ds_configs") + "/")
            assert a == (tmp_path / sub / name).read_text(), f"{sub}/{name} is stale: run accelerate_configs/regenerate.sh"
        assert not errors


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "accelerate_configs").glob("*.yaml")))
def test_committed_accelerate_configs_load_in_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "accelerate_configs" / f"{name}.yaml"))
    expected = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "zero3_offload": "DEEPSPEED",
                "fsdp": "FSDP", "fsdp1": "FSDP", "fsdp_offload": "FSDP"}[name]
    assert cfg.distributed_type.value == expected
    if expected == "DEEPSPEED":
        ds_file = ROOT / cfg.deepspeed_config["deepspeed_config_file"]
        assert ds_file.is_file()
        # ZeRO-3 configs say zero3_init_flag: false explicitly (the launcher loads on rank 0 and
        # DeepSpeed partitions; zero.Init cannot split 4-bit layers)
        assert ("zero3_init_flag" in cfg.deepspeed_config) == (name != "zero2")
        assert cfg.deepspeed_config.get("zero3_init_flag") in (None, False)
    if expected == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == (1 if name == "fsdp1" else 2)
        assert cfg.fsdp_config["fsdp_offload_params"] == (name == "fsdp_offload")
        if name == "fsdp1":
            assert cfg.fsdp_config["fsdp_use_orig_params"] is False


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_committed_deepspeed_configs_load_in_deepspeed(name):
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    raw["reduce_bucket_size"] = None  # accelerate fills the "auto" values from the model at prepare time
    raw["zero_optimization"] = {k: (1_000_000 if v == "auto" else v) for k, v in raw["zero_optimization"].items()}
    raw["train_batch_size"] = raw["train_micro_batch_size_per_gpu"] * raw["gradient_accumulation_steps"]
    ds = DeepSpeedConfig(raw)
    assert ds.zero_optimization_stage == (2 if name == "zero2" else 3)
    assert ds.zero_allow_untested_optimizer
    if name != "zero2":
        assert ds.zero_config.gather_16bit_weights_on_model_save  # else ZeRO-3 adapters save empty
    assert (ds.zero_config.offload_optimizer is not None) == (name == "zero3_offload")


# ---------------------------------------------------------------- FSDP2 on CPU


@pytest.mark.slow
def test_fsdp2_wrapping_of_4bit_lora_on_cpu(tmp_path):
    """torch fully_shard over gloo, 2 ranks, 3 steps; equals an unsharded run on both ranks' batches."""
    from launcher.cli import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests/helpers/fsdp_cpu.py"), str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["sharded"] > 0  # parameters really are DTensor shards
    assert not set(r0["ids"]) & set(r1["ids"])
    assert r0["digest"] == r1["digest"]  # the gathered adapter is the same on both ranks
    assert r0["n_trainable"] == 56 and r0["moved"] > 1e-4  # every LoRA tensor trained
    assert r0["max_diff"] < 1e-5  # and equals the unsharded reference


@pytest.mark.slow
@pytest.mark.parametrize("big", [False, True])
def test_fsdp2_ram_efficient_load(big, tmp_path):
    """Rank 0 reads the weights, rank 1 builds a meta skeleton and receives its shards: training
    matches the unsharded reference, and rank 1's load costs a fraction of rank 0's host memory."""
    from launcher.cli import _free_port

    model_dir = []
    if big:  # ~0.28B parameters (0.53 GB in bf16), so memory differences rise above noise
        sys.path.insert(0, str(ROOT / "bench"))
        from load_rss import build_model

        build_model(tmp_path / "model", 16, 1024)
        model_dir = [str(tmp_path / "model")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests/helpers/fsdp_lowmem.py"), str(tmp_path), *model_dir]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["digest"] == r1["digest"] and r0["max_diff"] < 1e-5
    if big:  # measured: rank 0 1.04 GB, rank 1 0.31 GB
        assert r1["load_gb"] < 0.5 * r0["load_gb"], (r0["load_gb"], r1["load_gb"])
