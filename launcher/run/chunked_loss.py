"""A causal-LM loss that never holds the full logits (`train.chunked_loss`).

The usual loss materializes tokens x vocab logits, upcasts them to fp32 and keeps them (and their
softmax and gradient) for backward: at a 32k-128k vocabulary that is the largest activation of a
QLoRA step. Here, in training mode, the model's output head passes the hidden states through
and the loss applies the head `chunk` tokens at a time under activation checkpointing, so at most
one chunk's logits exist at once, in forward and in backward (the idea of Liger's fused linear
cross-entropy and torchtune's chunked loss, in plain torch). The same sum, divided the same way
(by `num_items_in_batch` when given, else by the label count) as transformers' ForCausalLMLoss.

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
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            total = total + checkpoint(
                _chunk_sum, hidden[rows], head.weight, head.bias, targets[rows], use_reentrant=False
            )
        denominator = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE).sum()
        if torch.is_tensor(denominator):
            denominator = denominator.to(total.device)
        return total / denominator

    base.loss_function = loss_function
