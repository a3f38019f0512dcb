"""The planner answers for every architecture the launcher trains, not only Llama-style configs:
GPT-2 (n_embd, n_layer, Conv1D, fused qkv), BLOOM, OPT (ffn_dim), GPT-NeoX, Phi-3, Mixtral, Gemma 2,
Qwen 3. Each architecture's counted parameters equal the model transformers builds for it."""

import json

import pytest
import torch
from conftest import run_cli

from launcher.plan.archs import Arch

SMALL = {"vocab_size": 96, "max_position_embeddings": 256}
CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2),
    "gpt2": dict(n_embd=64, n_layer=3, n_head=4, n_positions=256),
    "bloom": dict(hidden_size=64, n_layer=3, n_head=4),
    "opt": dict(hidden_size=64, ffn_dim=256, num_hidden_layers=3, num_attention_heads=4, word_embed_proj_dim=64),
    "gpt_neox": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4),
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, pad_token_id=0),
    "mixtral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "gemma2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32),
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16),
}  # fmt: skip


def _config(kind: str) -> dict:
    return {"model_type": kind, **SMALL, **CONFIGS[kind]}


def _real_params(cfg: dict) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_counted_parameters_equal_the_built_model(kind):
    cfg = _config(kind)
    arch = Arch.from_config(cfg, kind)
    assert arch.params == _real_params(cfg)
    assert arch.layers == 3 and arch.hidden == 64 and arch.quantized_params > 0
    assert arch.lora_params(8, "all-linear") > 0


def test_config_names_are_mapped_not_required():
    """GPT-2 says n_embd / n_layer / n_inner (None: 4 x n_embd); OPT says ffn_dim."""
    gpt2, opt = Arch.from_config(_config("gpt2")), Arch.from_config(_config("opt"))
    assert (gpt2.hidden, gpt2.layers, gpt2.intermediate) == (64, 3, 256)
    assert set(gpt2.linears()) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert gpt2.linears()["attn.c_attn"] == (64, 192)  # q, k and v in one Conv1D
    assert opt.intermediate == 256


@pytest.mark.parametrize("kind", ["gpt2", "bloom", "opt"])
def test_launcher_plan_answers_for_the_architecture(kind, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(_config(kind)))
    res = run_cli("plan", f"model.name={tmp_path / 'm'}", "--gpus-per-node", "2", "--gpu-memory", "24GB", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["recommended"] and out["plans"], out


def test_an_architecture_transformers_does_not_know_is_one_error():
    from launcher.config.errors import UserError

    with pytest.raises(UserError, match="model.name: the planner cannot build m \\('nonesuch'\\)"):
        Arch.from_config({"model_type": "nonesuch", "hidden_size": 8}, "m")


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("strategy,world", [("single", 1), ("fsdp", 2)])
def test_the_trace_runs_for_the_architecture(kind, strategy, world, tmp_path):
    """`launcher plan --trace` builds each architecture as transformers does (no Llama stand-in), 4-bit
    layers packed by bitsandbytes, sharded by the launcher's FSDP2 over a fake 2-rank group."""
    from launcher import trace
    from launcher.config.recipe import Recipe

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(_config(kind)))
    recipe = Recipe.model_validate(
        {
            "model": {"name": str(tmp_path / "m"), "random_init": True},
            "data": {"path": "builtin:arithmetic", "max_seq_len": 64},
            "train": {"micro_batch_size": 2},
            "peft": {"dropout": 0.0 if kind == "mixtral" else 0.05},  # peft wraps MoE routers without dropout
            "dist": {"strategy": strategy, "nproc": world},
        }
    )
    t = trace.trace(recipe, str(tmp_path / "m"), strategy, world)
    assert t.device["parameters"] > 0 and t.device["activations"] > 0 and t.device_total > 0
    if strategy == "fsdp":
        assert t.device.get("gathered_params", 0) > 0  # the layers really were sharded and gathered


def test_a_moe_router_with_dropout_is_one_error_naming_the_fix(tmp_path):
    from launcher import trace
    from launcher.config.errors import UserError
    from launcher.config.recipe import Recipe

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(_config("mixtral")))
    recipe = Recipe.model_validate(
        {"model": {"name": str(tmp_path / "m"), "random_init": True}, "data": {"path": "builtin:arithmetic"}}
    )
    with pytest.raises(UserError, match="peft.method: .*set peft.dropout=0"):
        trace.trace(recipe, str(tmp_path / "m"), "single", 1)


def test_launcher_plan_trace_answers_for_gpt2(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(_config("gpt2")))
    res = run_cli(
        "plan", f"model.name={tmp_path / 'm'}", "data.max_seq_len=64", "--gpus-per-node", "2", "--trace", "--json"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    traced = {t["strategy"] for t in json.loads(res.stdout)["traced"]}
    assert traced == {"ddp", "fsdp", "fsdp_offload"}
