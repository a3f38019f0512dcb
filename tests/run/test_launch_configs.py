"""The generated accelerate and DeepSpeed configs: the committed ones are regenerated exactly and load
in accelerate's and DeepSpeed's own readers."""

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


def test_committed_configs_are_regenerated_exactly(tmp_path):
    env_bin = str(Path(sys.executable).parent)
    res = subprocess.run(
        ["bash", "accelerate_configs/regenerate.sh", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PATH": env_bin + ":/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    for sub in ("accelerate_configs", "ds_configs"):
        committed = sorted(p.name for p in (ROOT / sub).iterdir() if p.suffix in (".yaml", ".json"))
        fresh = sorted(p.name for p in (tmp_path / sub).iterdir())
        assert committed == fresh
        _, mismatch, errors = filecmp.cmpfiles(ROOT / sub, tmp_path / sub, committed, shallow=False)
        # DeepSpeed paths inside the YAML differ by the output directory only
        for name in mismatch:
            a = (ROOT / sub / name).read_text().replace("ds_configs/", str(tmp_path / "ds_configs") + "/")
            assert a == (tmp_path / sub / name).read_text(), (
                f"{sub}/{name} is stale: run accelerate_configs/regenerate.sh"
            )
        assert not errors


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "accelerate_configs").glob("*.yaml")))
def test_committed_accelerate_configs_load_in_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "accelerate_configs" / f"{name}.yaml"))
    expected = {
        "ddp": "MULTI_GPU",
        "zero2": "DEEPSPEED",
        "zero3": "DEEPSPEED",
        "zero3_offload": "DEEPSPEED",
        "fsdp": "FSDP",
        "fsdp1": "FSDP",
        "fsdp_offload": "FSDP",
    }[name]
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
