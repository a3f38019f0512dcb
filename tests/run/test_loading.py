"""Loading never holds a 16-bit copy of the model: weights are quantized as they stream in."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_4bit_load_peak_stays_well_below_the_16bit_size(tmp_path):
    from launcher.demo.builtin import write_random_llama

    model = write_random_llama(
        tmp_path / "m",
        dtype="bfloat16",
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=8000,
        tie_word_embeddings=False,
    )
    size16 = (model / "model.safetensors").stat().st_size / 2**30  # 0.60 GB
    res = subprocess.run(
        [sys.executable, str(ROOT / "tests/helpers/load_peak.py"), str(model)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    added = m["anon_peak_gb"] - m["anon_before_gb"]  # heap and tensors; the mmap'd file is page cache
    # The loaded 4-bit model (0.20 GB) plus at most 0.15 GB in flight (measured: 0.25-0.28 GB in
    # all; without launcher.run.model's malloc setting, 0.26-1.45 GB between identical runs).
    assert added < m["tensors_gb"] + 0.15, m
    assert added < 0.6 * size16, m
    assert m["tensors_gb"] < 0.4 * size16  # it really is 4-bit


def _config_only(path, **config):
    """A model directory with only config.json: what model.random_init needs."""
    from transformers import LlamaConfig

    LlamaConfig(**config).save_pretrained(path)
    return path


BIG = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=8000,
    tie_word_embeddings=False,
)


def test_random_init_builds_layer_by_layer_without_a_16bit_copy(tmp_path):
    """model.random_init: each weight is created and quantized at once, so the peak is the 4-bit
    model plus about one 16-bit matrix (here 11 MB), never the 0.60 GB 16-bit model."""
    model = _config_only(tmp_path / "m", **BIG)
    res = subprocess.run(
        [sys.executable, str(ROOT / "tests/helpers/load_peak.py"), str(model), "model.random_init=true"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    added = m["anon_peak_gb"] - m["anon_before_gb"]
    assert added < m["tensors_gb"] + 0.1, m
    assert m["tensors_gb"] < 0.25, m  # 4-bit layers, fp32 embeddings: 0.20 GB (fp32 model: 1.2 GB)
    assert m["file_peak_gb"] < 0.5, m  # nothing was read from disk


def test_zero3_load_reads_on_rank0_only(tmp_path):
    """Under ZeRO-3 only rank 0 reads and quantizes; rank 1 builds an empty skeleton that DeepSpeed
    fills one parameter at a time while partitioning (before: both ranks loaded the whole model)."""
    from conftest import run_cli

    from launcher.demo.builtin import write_random_llama

    model = write_random_llama(tmp_path / "m", dtype="bfloat16", **dict(BIG, num_hidden_layers=12))  # 0.33 GB
    run = tmp_path / "run"
    res = run_cli(
        "train",
        f"model.name={model}",
        "dist.strategy=zero3",
        "dist.nproc=2",
        f"train.output_dir={run}",
        "train.max_steps=1",
        "train.warmup_steps=0",
        "data.max_samples=64",
        "train.micro_batch_size=2",
        "data.eval_fraction=0",
        "data.log_sample_ids=true",
    )
    assert res.returncode == 0, res.stderr[-4000:]
    s = json.loads((run / "summary.json").read_text())
    rank0, rank1 = s["load_host_gb_per_rank"]
    # measured: rank 0 0.54 GB (4-bit model in fp32 containers, fp32 embeddings, the mmap'd file), rank 1 0.07 GB
    assert rank1 < 0.15 and rank1 < 0.25 * rank0, s  # before: each rank loaded the whole model
    ids = [
        json.loads(line) for r in (0, 1) for line in (run / "sample_ids" / f"rank{r}.jsonl").read_text().splitlines()
    ]
    digests = {row["adapter_sha256"] for row in ids if "adapter_sha256" in row}
    assert len(digests) == 1 and s["steps"] == 1  # both ranks trained the same adapter from rank 0's weights


def test_random_init_is_deterministic_and_shaped_like_a_loaded_model(tmp_path):
    import torch

    from launcher.config.recipe import load_recipe
    from launcher.demo.builtin import ensure_tiny_llama
    from launcher.plan import planner
    from launcher.run.model import load_base_model, load_tokenizer, resolve_source

    tiny = ensure_tiny_llama()
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text((tiny / "config.json").read_text())
    recipe = load_recipe(None, [f"model.name={cfg_dir}", "model.random_init=true"])
    source = resolve_source(recipe.model)
    assert len(load_tokenizer(source, recipe.model)) > 50  # the built-in tokenizer stands in
    a, b = (load_base_model(source, recipe.model, recipe.quant) for _ in range(2))
    loaded = load_base_model(str(tiny), recipe.model.model_copy(update={"random_init": False}), recipe.quant)
    assert [(n, type(m)) for n, m in a.named_modules()] == [(n, type(m)) for n, m in loaded.named_modules()]
    assert [(n, p.shape, p.dtype) for n, p in a.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in loaded.named_parameters()
    ]
    x = torch.randint(0, 50, (2, 12))
    torch.testing.assert_close(a(x).logits, b(x).logits, rtol=0, atol=0)  # same weights on every rank
    assert a.is_loaded_in_4bit
    # a planner preset needs no directory: 65B as a meta skeleton, the planner's parameter count
    big = load_recipe(None, ["model.name=llama-65b", "model.random_init=true"])
    skeleton = load_base_model(resolve_source(big.model), big.model, big.quant, device_map="meta")
    assert sum(p.numel() for p in skeleton.parameters()) == planner.PRESETS["llama-65b"].params  # not packed on meta
    assert {type(m).__name__ for m in skeleton.modules()} >= {"Linear4bit"}


def test_random_init_refuses_an_unknown_name():
    from conftest import run_cli

    res = run_cli("train", "model.name=llama-650b", "model.random_init=true")
    assert res.returncode == 2 and "model.name" in res.stderr and "\n" not in res.stderr.strip(), res.stderr
