"""launcher_sdpa: packed rows attend one sample at a time, with the same result as transformers'
block-diagonal SDPA and as running every sample alone."""

import pytest
import torch

from launcher.run import attention


def _models():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )  # grouped-query, as Llama-3
    out = []
    for impl in ("sdpa", attention.implementation("sdpa")):
        torch.manual_seed(0)
        out.append(LlamaForCausalLM._from_config(cfg, attn_implementation=impl).eval())
    return out


def _packed_batch():
    """Two rows of width 12: samples of 5+4 then padding 3; 7+5. Positions restart per sample."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (2, 12), generator=g)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]])
    return ids, pos


def test_registered_name_only_replaces_sdpa():
    assert attention.implementation("sdpa") == attention.NAME
    assert attention.implementation("eager") == "eager"
    assert attention.implementation("flash_attention_2") == "flash_attention_2"


def test_segments_split_where_positions_restart():
    _, pos = _packed_batch()
    assert attention.segments(pos) == [[0, 5, 9, 12], [0, 7, 12]]
    assert attention.segments(torch.arange(6)[None]) == [[0, 6]]


def test_packed_rows_match_block_diagonal_sdpa_and_each_sample_alone(monkeypatch):
    ref, ours = _models()
    ids, pos = _packed_batch()
    a = ref(input_ids=ids, position_ids=pos).logits
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(attention, "MIN_MEAN_LEN", 1)  # these samples are short: split them anyway
    monkeypatch.setattr(
        attention.F,
        "scaled_dot_product_attention",
        lambda q, k, v, **kw: calls.append((q.shape[2], kw.get("attn_mask"))) or sdpa(q, k, v, **kw),
    )
    b = ours(input_ids=ids, position_ids=pos).logits
    assert calls == [(5, None), (4, None), (3, None), (7, None), (5, None)] * 2  # per sample, unmasked, both layers
    monkeypatch.undo()
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    alone = ours(input_ids=ids[1:, 7:], position_ids=pos[1:, 7:]).logits  # second sample of row 1, unpacked
    assert torch.allclose(b[1:, 7:], alone, atol=1e-5)
    # not the same as full causal attention over the row: samples really are kept apart
    mixed = ours(input_ids=ids, position_ids=torch.arange(12).expand(2, -1)).logits
    assert (mixed[0, 5:9] - b[0, 5:9]).abs().max() > 1e-3


def test_short_samples_take_one_masked_call_with_the_same_result(monkeypatch):
    ref, ours = _models()
    ids, pos = _packed_batch()
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        attention.F,
        "scaled_dot_product_attention",
        lambda q, k, v, **kw: calls.append(kw.get("attn_mask") is not None) or sdpa(q, k, v, **kw),
    )
    b = ours(input_ids=ids, position_ids=pos).logits  # mean sample length 4.8 < MIN_MEAN_LEN
    monkeypatch.undo()
    assert calls == [True, True]  # one masked call per layer
    assert torch.allclose(ref(input_ids=ids, position_ids=pos).logits, b, atol=1e-5)


@pytest.mark.parametrize("min_mean_len", [1, 64])
def test_gradients_match_block_diagonal_sdpa(monkeypatch, min_mean_len):
    monkeypatch.setattr(attention, "MIN_MEAN_LEN", min_mean_len)
    ref, ours = _models()
    ids, pos = _packed_batch()
    for m in (ref, ours):
        m.train()
        m(input_ids=ids, position_ids=pos, labels=ids).loss.backward()
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name


def test_padded_rows_and_generation_use_transformers_sdpa():
    ref, ours = _models()
    ids, _ = _packed_batch()
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    a = ref(input_ids=ids, attention_mask=mask).logits
    b = ours(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a[0, :8], b[0, :8], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ref.generate(ids[:1, :6], **kw), ours.generate(ids[:1, :6], **kw))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_recipe_attention_reaches_the_loaded_model(tmp_path, impl):
    from launcher.config.recipe import ModelCfg, QuantCfg
    from launcher.demo import builtin
    from launcher.run.model import load_base_model

    model = load_base_model(
        str(builtin.ensure_tiny_llama()), ModelCfg(name="builtin:tiny-llama", attn_implementation=impl), QuantCfg()
    )
    assert model.config._attn_implementation == attention.implementation(impl)
