"""Run by torchrun (2 ranks, gloo): the launcher's FSDP2 wrapping of a 4-bit LoRA model, a few steps.

Every rank trains on its own shard of the data through `sharding.fsdp2_shard`. Rank 0 also
trains an unsharded copy on both ranks' batches (the DDP-equivalent reference). Each rank
writes OUT/rank{r}.json: sample ids, the gathered adapter digest, and the largest difference
from the reference (rank 0).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from launcher.config.recipe import load_recipe
from launcher.run import answers, data, placement, sharding
from launcher.run.model import apply_peft, load_base_model, load_tokenizer, resolve_source
from launcher.run.optim import build_optimizer

STEPS = 3


class Gloo:
    """What answers.score needs of an Accelerator: the device and a sum over the ranks."""

    device = torch.device("cpu")

    def __init__(self, alone: bool = False):
        self.alone = alone

    def reduce(self, tensor, reduction):
        if not self.alone:
            dist.all_reduce(tensor)
        return tensor


def build(recipe, source, storage):
    torch.manual_seed(recipe.train.seed)
    model = load_base_model(source, recipe.model, recipe.quant, storage=storage)
    return apply_peft(
        model, recipe.peft, quantized=True, kbit_upcast=placement.kbit_upcast("fsdp"), gradient_checkpointing=True
    )


def main(out: Path, optimizer: str):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    recipe = load_recipe(
        None,
        [
            "data.max_samples=200",
            "train.micro_batch_size=8",
            "peft.dropout=0.0",
            f"train.optimizer={optimizer}",
            "train.lr=1e-2",
        ],
    )
    source = resolve_source(recipe.model)
    storage = placement.storage_dtype(recipe, "fsdp", torch.float32)
    tok = load_tokenizer(source, recipe.model)
    prepared = data.prepare(recipe.data, tok, recipe.train.seed)
    train_ex, prompts = prepared.train, answers.prompts_of(prepared.eval_samples, 7)  # 4 prompts on rank 0, 3 on 1

    model = sharding.fsdp2_shard(build(recipe, source, storage))
    # eval_accuracy through the sharded forward before training (the base's answers: 1-3 digits, so the
    # ranks finish their prompts at different forwards and must agree when to stop)
    scored = answers.score(model, prompts, tok, Gloo(), rank, world, batch_size=2, max_new_tokens=4)
    opt = build_optimizer(model.parameters(), recipe.train)
    loaders = [data.make_loader(train_ex, 8, r, world, recipe.train.seed, tok.pad_token_id) for r in range(world)]
    batches = [list(loader)[:STEPS] for loader in loaders]  # every rank's batches (for the reference)
    ids, losses = [], []
    for step in range(STEPS):
        batch = dict(batches[rank][step])
        ids += batch.pop("sample_ids").tolist()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    adapter = sharding.trainable_state(model)
    result = {
        "accuracy": scored.accuracy,
        "answers": scored.answers,
        "rank": rank,
        "ids": ids,
        "losses": losses,
        "digest": sharding.digest(adapter),
        "sharded": sum(type(p).__name__ == "DTensor" or hasattr(p, "placements") for p in model.parameters()),
    }

    if rank == 0:  # the unsharded reference: mean of the ranks' losses, one optimizer step per step
        ref = build(recipe, source, storage)
        one = answers.score(ref, prompts[::world], tok, Gloo(alone=True), 0, 1, batch_size=2, max_new_tokens=4)
        result["reference_answers"] = one.answers
        whole = answers.score(ref, prompts, tok, Gloo(alone=True), 0, 1, batch_size=2, max_new_tokens=4)
        result["reference_accuracy"] = whole.accuracy
        init = {n: p.detach().clone() for n, p in ref.named_parameters() if p.requires_grad}
        ref_opt = build_optimizer(ref.parameters(), recipe.train)
        for step in range(STEPS):
            for r in range(world):
                batch = dict(batches[r][step])
                batch.pop("sample_ids")
                (ref(**batch).loss / world).backward()
            ref_opt.step()
            ref_opt.zero_grad()
        ref_state = {n: p.detach() for n, p in ref.named_parameters() if p.requires_grad}
        result["max_diff"] = max((adapter[n] - ref_state[n]).abs().max().item() for n in ref_state)
        result["moved"] = min((ref_state[n] - init[n]).abs().max().item() for n in ref_state)  # every tensor trained
        result["n_trainable"] = len(ref_state)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "adamw_torch")
