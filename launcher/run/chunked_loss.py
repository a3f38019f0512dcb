"""A causal-LM loss that never holds the full logits (`train.chunked_loss`).

The usual loss materializes tokens x vocab logits, upcasts them to fp32 and keeps them (and their
softmax and gradient) for backward: at a 32k-128k vocabulary that is the largest activation of a
QLoRA step. Here, in training mode, the model's output head passes the hidden states through
and the loss applies the head `chunk` tokens at a time, so at most one chunk's logits exist at
once. Only the tokens that have a label go through the head (a masked prompt's never reach it), and
while a chunk's logits exist its gradient with respect to the hidden states is taken there and then
(softmax less the one-hot target, times the head's weight), so backward scales a stored gradient and
never recomputes the head: two head matmuls a labelled token instead of three for every token (Liger's
fused linear cross-entropy, in plain torch). Where the head itself trains, each chunk runs under
activation checkpointing instead. The same sum, divided the same way (by `num_items_in_batch` when
given, else by the label count) as transformers' ForCausalLMLoss.

In eval mode the head computes real logits again (generation and `eval_accuracy` need them).
Models that post-process the logits (Gemma's soft-capping, a logit scale) are refused: their
loss would see the processed hidden states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
POSTPROCESS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def unsupported(config) -> str | None:
    """Why this model cannot take the chunked loss (None when it can)."""
    for name in POSTPROCESS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"its logits are post-processed ({name})"
    return None


def _chunk_sum(hidden: torch.Tensor, weight: torch.Tensor, bias, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


class _FrozenHeadLoss(torch.autograd.Function):
    """The summed cross-entropy of `hidden @ weight.T + bias` against `labels` (none ignored), a chunk of
    rows at a time, with d(sum)/d(hidden) taken in forward: backward only scales it."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk: int, grad: bool):
        """`chunk` rows at a time; `grad`: also d(sum)/d(hidden) (False under no_grad, where backward never comes)."""
        total = hidden.new_zeros((), dtype=torch.float32)
        dhidden = torch.empty_like(hidden) if grad else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = F.linear(hidden[rows], weight, bias).float()
            target = labels[rows, None]
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            total = total + (lse - logits.gather(1, target)).sum()
            if grad:  # softmax less the one-hot target, in place over the chunk's logits
                dlogits = logits.sub_(lse).exp_()
                dlogits.scatter_add_(1, target, dlogits.new_full(target.shape, -1.0))
                dhidden[rows] = dlogits.to(weight.dtype) @ weight
        if grad:
            ctx.save_for_backward(dhidden)
        return total

    @staticmethod
    def backward(ctx, dtotal):
        (dhidden,) = ctx.saved_tensors
        return dhidden * dtotal.to(dhidden.dtype), None, None, None, None, None


def _labelled_sum(hidden, head, targets, rows, chunk: int) -> torch.Tensor:
    """The loss's sum over `rows`, the rows that have a label."""
    hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)
    trains = head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad)
    if not trains:
        grad = torch.is_grad_enabled() and hidden.requires_grad
        return _FrozenHeadLoss.apply(hidden, head.weight, head.bias, targets, chunk, grad)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        total = total + checkpoint(_chunk_sum, hidden[rows], head.weight, head.bias, targets[rows], use_reentrant=False)
    return total


def install(model: torch.nn.Module, chunk: int) -> None:
    """Make `model` (a transformers causal LM, possibly inside peft) compute its training loss in chunks."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    head_forward = head.forward

    def forward(hidden):  # an instance attribute: the module, its name and its state dict stay as they are
        return hidden if head.training else head_forward(hidden)

    head.forward = forward
    standard = base.loss_function

    def loss_function(logits, labels, vocab_size, num_items_in_batch=None, shift_labels=None, **kwargs):
        if not head.training:  # real logits
            return standard(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch, **kwargs)
        hidden = logits.reshape(-1, logits.shape[-1])
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
        targets = shift_labels.reshape(-1).to(hidden.device)
        rows = (targets != IGNORE).nonzero().squeeze(1)  # one host sync a step, for the rows' count
        total = _labelled_sum(hidden, head, targets, rows, chunk)
        denominator = num_items_in_batch if num_items_in_batch is not None else rows.numel()
        if torch.is_tensor(denominator):
            denominator = denominator.to(total.device)
        return total / denominator

    base.loss_function = loss_function
