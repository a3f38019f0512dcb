"""Run by torchrun (2 ranks, gloo): the launcher's training step really run on CPU under each
strategy, counted by the same tracker the fake-tensor trace uses. Rank 0 writes OUT/real.json:
{strategy: {"device": {category: GB}, "host": {...}}}.

    torchrun --nproc_per_node 2 trace_ranks.py OUT MODEL SEQ MICRO_BATCH STRATEGY[,STRATEGY...]
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from launcher import trace
from launcher.plan.source import resolve_source
from launcher.run import console


def recipe(model: str, seq: int, mb: int):
    from launcher.config.recipe import Recipe

    return Recipe.model_validate(
        {
            "model": {"name": model, "random_init": True},
            "data": {"path": "builtin:arithmetic", "max_seq_len": seq},
            "train": {"micro_batch_size": mb},
        }
    )


def main(out: Path, model: str, seq: int, mb: int, strategies: list[str]) -> None:
    console.quiet_libraries()
    dist.init_process_group("gloo")
    r = recipe(model, seq, mb)
    results = {}
    for strategy in strategies:
        t = trace.trace(r, resolve_source(r.model), strategy, dist.get_world_size(), gpu=False, real=True)
        results[strategy] = {"device": t.device, "host": t.host}
    if dist.get_rank() == 0:
        (out / "real.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].split(","))
