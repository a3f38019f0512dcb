"""Where a training step's time goes, by kind of work: torch.profiler over three optimizer steps.

Python imports this file at start-up when its directory is on PYTHONPATH and STEP_PROFILE_DIR is set
(bench/vs_hf.py --profile does both, so every rank inherits it). Steps are counted by a global
optimizer post-hook, so the launcher and TRL are profiled the same way: steps 1-2 are skipped
(first-step costs), step 3 warms the profiler, steps 4-6 are recorded. Each op's own time (its
children's excluded) goes to one kind by its name, and to a phase by its enclosing events: the
optimizer step, the recompute of checkpointed layers, the rest of backward (the autograd engine's
nodes), or forward. Rank 0 writes STEP_PROFILE_DIR/<pid>.json: seconds per step. The profiler
slows every op a little: these runs are not timed.
"""

import json
import os

ACTIVE = 3
RECOMPUTE = "checkpoint recompute"

if os.environ.get("STEP_PROFILE_DIR"):
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    def kind(name: str) -> str:
        n = name.lower()
        if "gloo" in n or "nccl" in n or "all_reduce" in n or "allreduce" in n or "c10d::" in n:
            return "communication"
        if not n.startswith(("aten::", "bitsandbytes::")):
            return "other ops"
        if n.startswith("bitsandbytes::") or "dequantize" in n:
            return "4-bit dequantize"
        if n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm") or "mkldnn_matmul" in n:
            return "matmul"
        if "scaled_dot_product" in n or "flash_attention" in n or "efficient_attention" in n:
            return "attention"
        if "softmax" in n or "nll_loss" in n or "cross_entropy" in n:
            return "loss"
        if any(
            k in n
            for k in (
                "copy",
                "clone",
                "contiguous",
                "cat",
                "stack",
                "index",
                "embedding",
                "gather",
                "scatter",
                "::to",
                "split",
                "pad",
                "narrow",
            )
        ):
            return "copies and indexing"
        return "elementwise and reductions"

    def phase(event) -> str:
        p = event.cpu_parent
        while p is not None:
            if p.name.startswith("Optimizer.step"):
                return "optimizer"
            if p.name == RECOMPUTE:
                return "recompute"
            if p.name.startswith("autograd::engine::evaluate_function"):
                return "backward"
            p = p.cpu_parent
        return "forward"

    def report(prof) -> None:
        if int(os.environ.get("RANK", 0)):
            return
        kinds: dict = {}
        phases: dict = {}
        total = step = 0.0
        for e in prof.events():
            s = e.self_cpu_time_total / 1e6 / ACTIVE
            if e.name.startswith("ProfilerStep"):
                step += e.cpu_time_total / 1e6 / ACTIVE
            if s <= 0 or e.name == RECOMPUTE or e.name.startswith(("ProfilerStep", "Optimizer.step", "autograd::")):
                continue
            total += s
            k, ph = kind(e.name), phase(e)
            kinds[k] = kinds.get(k, 0.0) + s
            phases[ph] = phases.get(ph, 0.0) + s
        # the step's wall time less its ops' own time: Python, the data loader, waits
        kinds["between ops"] = max(step - total, 0.0)
        out = {
            "step_s": round(step, 4),
            "ops_s_per_step": round(total, 4),
            "kinds_s": {k: round(v, 4) for k, v in sorted(kinds.items())},
            "phases_s": {k: round(v, 4) for k, v in sorted(phases.items())},
        }
        with open(os.path.join(os.environ["STEP_PROFILE_DIR"], f"{os.getpid()}.json"), "w") as f:
            json.dump(out, f)

    def _mark_recompute() -> None:
        """Non-reentrant checkpointing's recompute runs inside backward; a named range marks it (a
        private class of torch's: without it the recompute counts as backward)."""
        frame = getattr(torch.utils.checkpoint, "_CheckpointFrame", None)
        if frame is None:
            return
        init = frame.__init__

        def wrapped(self, recompute_fn, *a, **kw):
            def marked(*args):
                with torch.profiler.record_function(RECOMPUTE):
                    return recompute_fn(*args)

            init(self, marked, *a, **kw)

        frame.__init__ = wrapped

    _mark_recompute()
    _prof = profile(
        activities=[ProfilerActivity.CPU], schedule=schedule(wait=2, warmup=1, active=ACTIVE), on_trace_ready=report
    )
    _prof.__enter__()
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(lambda *a: _prof.step())
