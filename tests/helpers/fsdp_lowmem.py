"""Run by torchrun (2 ranks, gloo): RAM-efficient FSDP2 loading (`sharding.load_fsdp2`).

Rank 0 loads the 4-bit model; rank 1 builds a meta skeleton and receives its shards. Both then
train a few steps; rank 0 compares the gathered adapter with an unsharded reference trained on
both ranks' batches. Each rank writes OUT/rank{r}.json with its load's host-memory cost.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from launcher.config.recipe import load_recipe
from launcher.run import data, metrics, placement, sharding
from launcher.run.model import apply_peft, load_base_model, load_tokenizer, resolve_source
from launcher.run.optim import build_optimizer

STEPS = 3


def main(out: Path, model_dir: str | None):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    over = [
        "data.max_samples=200",
        "train.micro_batch_size=8",
        "peft.dropout=0.0",
        "train.optimizer=adamw_torch",
        "train.lr=1e-2",
    ] + ([f"model.name={model_dir}"] if model_dir else [])
    recipe = load_recipe(None, over)
    source = resolve_source(recipe.model)
    storage = placement.storage_dtype(recipe, "fsdp", torch.float32)
    tok = load_tokenizer(source, recipe.model)
    train_ex, _, _ = data.load_data(recipe.data, tok, recipe.train.seed)

    def load(device_map):
        return load_base_model(source, recipe.model, recipe.quant, device_map=device_map, storage=storage)

    def wrap(model):
        torch.manual_seed(recipe.train.seed)
        return apply_peft(model, recipe.peft, quantized=True, kbit_upcast=False, gradient_checkpointing=True)

    rss_before = metrics.host_rss_gb()
    model = sharding.load_fsdp2(load, wrap, offload=False, device=torch.device("cpu"))
    load_gb = metrics.host_rss_gb(peak=True) - rss_before
    opt = build_optimizer(model.parameters(), recipe.train)
    loaders = [data.make_loader(train_ex, 8, r, world, recipe.train.seed, tok.pad_token_id) for r in range(world)]
    batches = [list(loader)[:STEPS] for loader in loaders]
    for step in range(STEPS):
        batch = {k: v for k, v in batches[rank][step].items() if k not in ("sample_ids", "real_tokens")}
        model(**batch, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
    adapter = sharding.trainable_state(model)
    result = {"rank": rank, "load_gb": load_gb, "digest": sharding.digest(adapter)}
    if rank == 0:
        ref = wrap(load(None))
        ref_opt = build_optimizer(ref.parameters(), recipe.train)
        for step in range(STEPS):
            for r in range(world):
                batch = {k: v for k, v in batches[r][step].items() if k not in ("sample_ids", "real_tokens")}
                (ref(**batch, use_cache=False).loss / world).backward()
            ref_opt.step()
            ref_opt.zero_grad()
        ref_state = {n: p.detach() for n, p in ref.named_parameters() if p.requires_grad}
        result["max_diff"] = max((adapter[n] - ref_state[n]).abs().max().item() for n in ref_state)
        result["n_trainable"] = len(ref_state)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
