"""train.fused_ops: the rewritten LoRA linear, SwiGLU and RMSNorm compute what peft and transformers
compute (loss and every adapter gradient), on every architecture the launcher supports, and keep
fewer bytes for backward."""

import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "helpers"))
from train_archs import ARCHS, build  # noqa: E402

# What install() rewrites where: the LoRA linears everywhere, SwiGLU and the norm where the
# architecture computes them as Llama does.
LLAMA_LIKE = {"llama", "qwen2", "qwen3", "mistral"}


def _model(src, fused: bool, dtype=torch.float32, checkpointing: bool = True, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from launcher.run import fused as fused_ops
    from launcher.run.model import enable_checkpointing

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=q, dtype=dtype)
    torch.manual_seed(1)  # init_lora_weights=False: B is not zero, so every path carries gradient
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False)
    model = get_peft_model(model, cfg)
    if checkpointing:
        enable_checkpointing(model)  # non-reentrant, every layer, as the run does
    counts = fused_ops.install(model) if fused else {}
    return model.train(), counts  # training mode: checkpointing and dropout act


def _step(model, ids, seed: int = 0):
    torch.manual_seed(seed)  # the same dropout masks both ways
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(plain, fused, rel=1e-5):
    assert torch.allclose(plain[0], fused[0], rtol=rel), (plain[0], fused[0])
    assert plain[1].keys() == fused[1].keys() and plain[1]
    for name, grad in plain[1].items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert (grad - fused[1][name]).abs().max() <= rel * scale * 10, name


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {arch: build(arch, root / arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fused_step_equals_peft_and_transformers(arch, arch_dirs):
    ids = torch.randint(3, 40, (2, 48), generator=torch.Generator().manual_seed(0))
    plain = _step(_model(arch_dirs[arch], False)[0], ids)
    model, counts = _model(arch_dirs[arch], True)
    assert counts["lora"] >= 4  # every architecture has LoRA linears
    if arch in LLAMA_LIKE:
        assert counts["swiglu"] == 2 and counts["rmsnorm"] >= 5
    _assert_same(plain, _step(model, ids))


def test_fused_with_dropout_and_mixed_dtypes_equals_peft(arch_dirs):
    """LoRA dropout draws the same masks; a bf16 base with an fp32 adapter (k-bit upcast) takes peft's
    own arithmetic for the sum, so the result is bit for bit peft's."""
    ids = torch.randint(3, 40, (2, 48), generator=torch.Generator().manual_seed(0))
    src = arch_dirs["llama"]
    _assert_same(_step(_model(src, False, dropout=0.1)[0], ids), _step(_model(src, True, dropout=0.1)[0], ids))
    plain, fused = _model(src, False, torch.bfloat16)[0], _model(src, True, torch.bfloat16)[0]
    for m in (plain, fused):
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, fused(input_ids=ids).logits)


def test_disabled_or_merged_adapters_take_peft_forward(arch_dirs):
    src = arch_dirs["llama"]
    ids = torch.randint(3, 40, (1, 16), generator=torch.Generator().manual_seed(0))
    model = _model(src, True, checkpointing=False)[0].eval()
    with torch.no_grad():
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        on = model(input_ids=ids).logits
    base = _model(src, False, checkpointing=False)[0].eval()
    with torch.no_grad(), base.disable_adapter():
        assert torch.allclose(off, base(input_ids=ids).logits, atol=1e-6)
    assert not torch.allclose(on, off)  # the adapter is applied when it is enabled


def test_recompute_skips_the_frozen_matmul_that_ends_a_layer(arch_dirs):
    """The adapter path runs before the frozen matmul, so a checkpointed layer's recompute (which stops
    once its last saved tensor is back) never runs down_proj's 4-bit matmul again; peft's order runs it
    in forward and in the recompute. The other linears' outputs feed later ops and are recomputed."""
    src = arch_dirs["llama"]
    ids = torch.randint(3, 40, (2, 48), generator=torch.Generator().manual_seed(0))

    def runs(fused: bool) -> dict[str, int]:
        model = _model(src, fused, dropout=0.1)[0]
        counts: dict[str, int] = {}
        for name, module in model.named_modules():
            if name.endswith(("layers.0.mlp.down_proj.base_layer", "layers.0.self_attn.q_proj.base_layer")):
                key = name.split(".")[-2]
                module.register_forward_hook(lambda *_, key=key: counts.__setitem__(key, counts.get(key, 0) + 1))
        _step(model, ids)
        return counts

    assert runs(False) == {"q_proj": 2, "down_proj": 2}
    assert runs(True) == {"q_proj": 2, "down_proj": 1}


def test_fused_layers_keep_less_for_backward(arch_dirs):
    """Per token and layer at least SwiGLU's act(gate) (intermediate x 4 bytes in fp32) fewer."""
    sys.path.insert(0, str(ROOT))
    from bench.fused_ops import saved_mb  # what bench/fused_ops.py reports as a kept layer's bytes

    src = arch_dirs["llama"]
    ids = torch.randint(3, 40, (2, 64), generator=torch.Generator().manual_seed(0))
    plain = saved_mb(_model(src, False, checkpointing=False)[0], ids) * 2**20
    fused = saved_mb(_model(src, True, checkpointing=False)[0], ids) * 2**20
    layers, tokens, inter = 2, ids.numel(), 128
    assert plain - fused >= layers * tokens * inter * 4, (plain, fused)


def test_compiled_layers_train_like_eager(arch_dirs):
    """train.compile: every decoder layer compiled in place (names and state dict as they were); two
    packed-length steps (different token counts, one compile) give eager's loss and gradients."""
    from launcher.run import fused as fused_ops

    src = arch_dirs["llama"]
    eager, compiled = _model(src, True)[0], _model(src, True)[0]
    keys = set(compiled.state_dict())
    assert fused_ops.compile_layers(compiled) == 2 and set(compiled.state_dict()) == keys
    for length in (48, 40):
        ids = torch.randint(3, 40, (1, length), generator=torch.Generator().manual_seed(length))
        _assert_same(_step(eager, ids), _step(compiled, ids), rel=1e-4)
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)


def test_compile_under_a_strategy_it_has_not_run_under_is_refused_naming_the_field():
    from launcher.config.recipe import load_recipe
    from launcher.run import placement

    recipe = load_recipe(None, ["train.compile=true"])
    assert not placement.placement_problems(recipe, "ddp", placement.Machine(0), {})
    (problem,) = placement.placement_problems(recipe, "zero2", placement.Machine(0), {})
    assert problem.startswith("train.compile: not under zero2") and "set it to false" in problem


def test_compile_finds_no_layers_in_a_model_without_decoder_layers():
    """What makes `train.compile` refuse a model ("found no decoder layers to compile"): nothing to
    compile is a count of 0, and nothing is compiled."""
    from launcher.run import fused as fused_ops

    plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    assert fused_ops.compile_layers(plain) == 0
    assert all(m._compiled_call_impl is None for m in plain.modules())


def test_a_compiled_run_trains_and_its_adapter_loads(tmp_path):
    """`launcher train train.compile=true` end to end on the built-in model: the run finishes and saves
    an adapter with the usual names (Module.compile keeps them)."""
    import json

    from conftest import run_cli
    from safetensors.torch import load_file

    run = tmp_path / "run"
    common = ["train.max_steps=2", "train.warmup_steps=0", "data.max_samples=64", "data.eval_fraction=0"]
    res = run_cli("train", "train.compile=true", *common, f"train.output_dir={run}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    keys = load_file(run / "adapter_model.safetensors").keys()
    assert keys and not any("_orig_mod" in k for k in keys)
