"""train.chunked_loss: the same loss and gradients as transformers' full-logits loss, real logits in
eval mode, less memory at a large vocabulary, the head's matmuls only where they are needed, and
refused where it cannot work."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from launcher.config.recipe import load_recipe
from launcher.demo import builtin
from launcher.plan import memtrack
from launcher.run import chunked_loss
from launcher.run.model import apply_peft, load_base_model


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    """A 2-layer model whose 8,000-entry vocabulary makes the logits its largest activation."""
    where = tmp_path_factory.mktemp("v8k") / "model"
    return builtin.write_random_llama(
        where,
        vocab_size=8000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def _model(path, chunk: int):
    r = load_recipe(None, [f"model.name={path}", "peft.dropout=0.0"])
    torch.manual_seed(0)
    model = apply_peft(
        load_base_model(str(path), r.model, r.quant),
        r.peft,
        quantized=True,
        kbit_upcast=True,
        gradient_checkpointing=True,
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    if chunk:
        chunked_loss.install(model, chunk)
    return model.train()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 50, (2, 40), generator=g)
    labels = ids.clone()
    labels[:, :7] = -100  # a masked prompt
    labels[1, 30:] = -100  # and padding
    return ids, labels


@pytest.mark.parametrize("items", [None, 50])
def test_the_same_loss_and_gradients_as_the_full_logits(big_vocab, items):
    ids, labels = _batch()
    out = {}
    for chunk in (0, 7):  # 7 does not divide the 80 tokens
        model = _model(big_vocab, chunk)
        kw = {} if items is None else {"num_items_in_batch": items}
        loss = model(input_ids=ids, labels=labels, use_cache=False, **kw).loss
        loss.backward()
        out[chunk] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(out[7][0], out[0][0], atol=1e-6, rtol=1e-5)
    for n, g in out[0][1].items():
        torch.testing.assert_close(out[7][1][n], g, atol=1e-6, rtol=1e-4)


class _HeadRows(TorchDispatchMode):
    """Rows multiplied by the output head's 8000 x 64 weight, forward and backward."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = args[-2:]
            if 8000 in a.shape or 8000 in b.shape:
                self.rows += a.shape[0]
        return func(*args, **(kwargs or {}))


def test_the_head_runs_forward_and_input_gradient_over_labelled_tokens_only(big_vocab):
    ids, labels = _batch()
    labelled = int((labels[:, 1:] != -100).sum())  # the tokens that predict a label: 56 of 80
    rows = {}
    for chunk in (0, 16):
        model = _model(big_vocab, chunk)
        with _HeadRows() as counted:
            model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        rows[chunk] = counted.rows
    assert rows[0] == 2 * 80  # the full loss: every token, forward and input gradient
    assert rows[16] == 2 * labelled  # no recompute, and never a masked token


def test_a_head_that_trains_gets_the_gradient_of_the_full_loss(big_vocab):
    ids, labels = _batch()
    grads = {}
    for chunk in (0, 16):
        model = _model(big_vocab, chunk)
        head = model.get_base_model().get_output_embeddings()
        head.weight.requires_grad_(True)
        model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        grads[chunk] = head.weight.grad.clone()
    torch.testing.assert_close(grads[16], grads[0], atol=1e-6, rtol=1e-4)


def test_eval_mode_has_real_logits(big_vocab):
    model = _model(big_vocab, 16).eval()
    ids, labels = _batch()
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, use_cache=False)
    assert out.logits.shape == (2, 40, 8000) and torch.isfinite(out.loss)


def test_peak_memory_drops_by_most_of_the_logits(big_vocab):
    ids, labels = _batch()
    peaks = {}
    for chunk in (0, 16):
        model = _model(big_vocab, chunk)
        with memtrack.Tracker() as tracker:
            model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        peaks[chunk] = tracker.peaks()["device"].total / 2**20
    logits_mb = 2 * 40 * 8000 * 4 / 2**20  # one fp32 copy: 2.4 MiB
    assert peaks[0] - peaks[16] > 2 * logits_mb, peaks  # the full loss keeps several copies


def test_refused_where_it_cannot_work():
    from transformers import Gemma2Config, LlamaConfig

    assert "final_logit_softcapping" in chunked_loss.unsupported(Gemma2Config())
    assert chunked_loss.unsupported(LlamaConfig()) is None
