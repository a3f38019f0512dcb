"""Loading the base model and wrapping it with peft: clear errors, every peft method through a step."""

import pytest
import torch
from conftest import run_cli

from launcher.config.errors import UserError


def test_missing_model_dir_is_a_clear_error(tmp_path):
    res = run_cli("train", f"model.name={tmp_path / 'nope'}", f"train.output_dir={tmp_path / 'o'}")
    assert res.returncode == 2 and "model.name: no such model directory" in res.stderr
    (tmp_path / "empty").mkdir()
    res = run_cli("train", f"model.name={tmp_path / 'empty'}", f"train.output_dir={tmp_path / 'o'}")
    assert res.returncode == 2 and "no config.json" in res.stderr


def test_target_module_that_matches_nothing_lists_linear_layers():
    from launcher.config.recipe import load_recipe
    from launcher.run.model import apply_peft, load_base_model, resolve_source

    r = load_recipe(None, ["peft.target_modules=[q_proj,qkv_proj]"])
    model = load_base_model(resolve_source(r.model), r.model, r.quant)
    with pytest.raises(UserError, match=r"qkv_proj not in the model; linear layers: down_proj, gate_proj, k_proj"):
        apply_peft(model, r.peft, quantized=True, kbit_upcast=True, gradient_checkpointing=False)
    r = load_recipe(None, ["peft.target_modules=.*attn_x.*"])
    with pytest.raises(UserError, match="matches no module"):
        apply_peft(model, r.peft, quantized=True, kbit_upcast=True, gradient_checkpointing=False)


@pytest.mark.parametrize(
    "method, extra",
    [
        ("prompt_tuning", []),
        ("ia3", []),
        ("adalora", []),
        ("prefix_tuning", ["train.gradient_checkpointing=false"]),
        ("loha", ["quant.mode=none"]),
        ("lora", ["peft.use_dora=true"]),
        ("lora", ["quant.mode=int8"]),
        ("lora", ["quant.mode=fp4"]),
        ("lora", ["quant.mode=none", "peft.use_rslora=true"]),
    ],
)
def test_peft_methods_train_a_step(method, extra):
    from launcher.config.recipe import load_recipe
    from launcher.run.model import apply_peft, count_parameters, load_base_model, resolve_source

    r = load_recipe(None, [f"peft.method={method}", *extra])
    model = load_base_model(resolve_source(r.model), r.model, r.quant)
    model = apply_peft(
        model,
        r.peft,
        quantized=r.quant.mode != "none",
        kbit_upcast=True,
        gradient_checkpointing=r.train.gradient_checkpointing,
        total_steps=10,
    )
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    x = torch.randint(4, 40, (2, 10))
    model(input_ids=x, labels=x).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_unknown_peft_option_names_the_field():
    from launcher.config.recipe import load_recipe
    from launcher.run.model import peft_config

    with pytest.raises(UserError, match="peft.options: LoraConfig rejects them"):
        peft_config(load_recipe(None, ["peft.options={bogus: 1}"]).peft)


def test_checkpoint_every_recomputes_every_nth_layer_with_the_same_gradients():
    """train.checkpoint_every=2 on the 4-layer tiny model: layers 0 and 2 recompute, 1 and 3 keep their
    activations; with 3 kept layers (train.memory_budget_gb's choice) only layer 0 recomputes; the LoRA
    gradients equal those of full checkpointing and of none (the same math)."""
    from launcher.config.recipe import load_recipe
    from launcher.run.model import apply_peft, load_base_model, resolve_source

    r = load_recipe(None, ["peft.dropout=0.0"])
    x = torch.randint(4, 40, (2, 12))
    grads, flags = {}, {}
    cases = (("all", True, 1, 0), ("half", True, 2, 0), ("kept3", True, 1, 3), ("none", False, 1, 0))
    for name, on, every, kept in cases:
        torch.manual_seed(0)
        model = apply_peft(
            load_base_model(resolve_source(r.model), r.model, r.quant),
            r.peft,
            quantized=True,
            kbit_upcast=True,
            gradient_checkpointing=on,
            checkpoint_every=every,
            kept_layers=kept,
        )
        with torch.no_grad():  # a non-zero B, so every LoRA tensor gets a gradient
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        flags[name] = [layer.gradient_checkpointing for layer in model.base_model.model.model.layers]
    assert flags == {
        "all": [True] * 4,
        "half": [True, False, True, False],
        "kept3": [True, False, False, False],
        "none": [False] * 4,
    }
    for name in ("half", "kept3", "none"):
        for n, g in grads["all"].items():
            torch.testing.assert_close(grads[name][n], g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_checkpointed_backward_stops_at_the_first_layer(quant):
    """transformers (and peft, on an unquantized base) hook the embeddings so their output requires
    grad, which only reentrant checkpointing needs: the launcher removes the hooks, so backward does not
    run the first layer's input gradients into frozen embeddings; every adapter tensor still gets one."""
    from launcher.config.recipe import load_recipe
    from launcher.run.model import apply_peft, load_base_model, resolve_source

    r = load_recipe(None, [f"quant.mode={quant}"])
    base = load_base_model(resolve_source(r.model), r.model, r.quant)
    model = apply_peft(base, r.peft, quantized=quant != "none", kbit_upcast=True, gradient_checkpointing=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, i, out: seen.append(out.requires_grad))
    x = torch.randint(4, 40, (2, 12))
    model.train()(input_ids=x, labels=x).loss.backward()
    assert seen == [False]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
