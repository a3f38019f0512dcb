"""The machine's sustained matmul FLOP/s at a training step's shapes, measured in the benchmark's
own run: the ceiling a model FLOP utilisation (MFU) is read against.

For every linear layer of one decoder layer and the head, the two matmuls a frozen QLoRA weight
costs per step (forward: tokens x in @ in x out; input gradient: tokens x out @ out x in) are
timed at the step's token count in the compute dtype, each repeated for at least `seconds`; the
figure is their total FLOPs over their total time (FLOP-weighted, as the step spends it).

    python bench/matmul_peak.py --model-dir DIR --tokens 1024 [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import time


def peak_flops(linears: list[tuple[int, int]], tokens: int, dtype=None, seconds: float = 0.3) -> float:
    import torch

    dtype = dtype or torch.float32
    flops = spent = 0.0
    for i, o in linears:
        x, w, g = (torch.randn(*shape, dtype=dtype) for shape in ((tokens, i), (i, o), (tokens, o)))
        for a, b in ((x, w), (g, w.t())):
            a @ b  # warm
            n, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds:
                a @ b
                n += 1
            flops += 2.0 * a.shape[0] * a.shape[1] * b.shape[1] * n
            spent += elapsed
    return flops / spent


def step_shapes(model_dir: str) -> list[tuple[int, int]]:
    """One decoder layer's linears and the head, as (in, out)."""
    from launcher.plan.archs import Arch
    from launcher.plan.source import model_config

    arch = Arch.from_config(model_config(model_dir))
    return [*arch.linears().values(), (arch.hidden, arch.vocab)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    gflops = peak_flops(step_shapes(args.model_dir), args.tokens) / 1e9
    print(json.dumps({"tokens": args.tokens, "matmul_gflops": round(gflops, 1)}))


if __name__ == "__main__":
    main()
