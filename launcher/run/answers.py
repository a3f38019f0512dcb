"""Task accuracy: greedy answers to held-out prompts, scored by exact match (`eval_accuracy`).

Loss says the adapter moved; accuracy says it learned the task. Each eval, up to
`train.eval_accuracy_samples` eval prompts (prompt/completion, alpaca or chat data: anything with a
prompt) are completed greedily and an answer counts when its text, stripped, equals the reference
completion, stripped. The prompts are split over the ranks; every rank runs the same number of
batches and the same number of forwards, so sharded strategies (ZeRO-3, FSDP) work as well.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from launcher.config.errors import UserError

if TYPE_CHECKING:  # annotations only
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


@dataclass
class Scored:
    accuracy: float
    example: tuple[str, str, str] | None  # (prompt, answer, expected), this rank's first prompt
    answers: list[str]  # this rank's answers, in the order of items[rank::world]


def prompts_of(examples: list[dict], n: int, fmt: str = "prompt_completion") -> list[dict]:
    """The first `n` eval examples that have a prompt and a completion (unpacked, with prompt_len);
    plain text (data format `fmt`) has no prompt to ask."""
    if not n:
        return []
    if fmt == "text":
        raise UserError(
            "train.eval_accuracy_samples: needs data with a prompt (prompt_completion, alpaca or chat); "
            "this data is plain text (set it to 0)"
        )
    asked = (e for e in examples if 0 < e.get("prompt_len", 0) < len(e["input_ids"]))
    return list(itertools.islice(asked, n))  # read from the cache only as far as needed


def _reference(ex: dict, eos_id) -> list[int]:
    ref = ex["input_ids"][ex["prompt_len"] :]
    return ref[:-1] if ref and ref[-1] == eos_id else ref


def _left_padded(batch: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, p in enumerate(batch):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def greedy(
    model: torch.nn.Module,
    prompts: list[list[int]],
    pad_id: int,
    eos_id,
    max_new_tokens: int,
    device: torch.device,
    agree=None,
) -> list[list[int]]:
    """Greedy answers (token ids, without the end-of-sequence token) through the training model's own
    forward: the same call under DDP, ZeRO and FSDP, where the wrapper gathers shards, so no
    KV cache and no generate(). Rows are left-padded, positions follow the mask, and only the
    last position's logits are computed. `agree(still_going) -> bool` makes every rank run the
    same number of forwards (sharded models need all ranks in each one). Seven values: a generation
    loop's own (prompts, pad, end, length, device) beside the model and the ranks' agreement."""
    ids, mask = _left_padded(prompts, pad_id, device)
    answers: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(max_new_tokens):
        going = not bool(done.all())
        if not (agree(going) if agree is not None else going):
            break
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False, logits_to_keep=1
        ).logits
        nxt = logits[:, -1].argmax(-1)
        for row, token in enumerate(nxt.tolist()):
            if not done[row]:
                if token == eos_id:
                    done[row] = True
                else:
                    answers[row].append(token)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return answers


def score(
    model: torch.nn.Module,
    items: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    accelerator: Accelerator,
    rank: int,
    world: int,
    batch_size: int,
    max_new_tokens: int,
) -> Scored:
    """Exact-match accuracy of greedy answers to `items` over all ranks (one reduce at the end). Plain
    values, not the run context: tests score a bare model over gloo ranks with no run around it."""
    mine = items[rank::world]
    per_rank = -(-len(items) // world)  # every rank runs the same batches; fillers are not counted
    padded = mine + [items[0]] * (per_rank - len(mine))
    agree = None
    if world > 1:

        def agree(going: bool) -> bool:
            flag = torch.tensor([float(going)], device=accelerator.device)
            return accelerator.reduce(flag, "sum").item() > 0

    was_training = model.training
    model.eval()
    right, example, said = 0, None, []
    for start in range(0, len(padded), batch_size):
        chunk = padded[start : start + batch_size]
        prompts = [e["input_ids"][: e["prompt_len"]] for e in chunk]
        outs = greedy(
            model, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id, max_new_tokens, accelerator.device, agree
        )
        for k, (ex, out) in enumerate(zip(chunk, outs)):
            if start + k >= len(mine):
                break
            answer = tokenizer.decode(out, skip_special_tokens=True).strip()
            expected = tokenizer.decode(_reference(ex, tokenizer.eos_token_id), skip_special_tokens=True).strip()
            right += answer == expected
            said.append(answer)
            if example is None:
                example = (tokenizer.decode(prompts[k], skip_special_tokens=True), answer, expected)
    model.train(was_training)
    total = accelerator.reduce(torch.tensor([float(right), float(len(mine))], device=accelerator.device), "sum")
    return Scored(total[0].item() / max(total[1].item(), 1), example, said)
