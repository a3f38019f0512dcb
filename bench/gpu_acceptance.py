"""The steps of bench/gpu_acceptance.sh, each in its own process with its own time limit.

1. gpu_tests: `pytest -m gpu tests/test_gpu.py` (--dry: collected, not run: they skip without a GPU).
2. vs_trl: bench/vs_hf.py's packed 8B run (random weights, 2,048-token rows) against TRL's
   SFTTrainer on the same samples (--dry: the built-in tiny model, 128-token rows, on this CPU).
3. plan: the planner's allocated and reserved peaks and tokens/s for that run, next to what it
   measured, and MFU (the step's FLOPs as throughput.flops_per_token counts them) over the peak.

Everything goes into OUT/acceptance.json, rewritten after each step.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMITS_S = {"gpu_tests": 300, "vs_trl": 210}  # with the plan's seconds: under 9 minutes on one GPU
SAMPLES = {"gpu": 300, "dry": 40}


def run(cmd: list[str], limit: int, log: Path) -> dict:
    start = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        rc, out = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, f"{e.stdout or ''}{e.stderr or ''}\nstopped after {limit} s"
    log.write_text(out if isinstance(out, str) else out.decode(errors="replace"))
    return {"rc": rc, "seconds": round(time.perf_counter() - start, 1), "log": log.name}


def gpu_tests(out: Path, dry: bool) -> dict:
    xml = out / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"]
    cmd += ["--collect-only"] if dry else [f"--junitxml={xml}"]
    r = run(cmd, LIMITS_S["gpu_tests"], out / "gpu_tests.log")
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        r.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    else:
        r["collected"] = (out / "gpu_tests.log").read_text().count("::")
    return r


def vs_trl(out: Path, dry: bool) -> dict:
    summary = out / "vs_trl.json"
    cmd = [sys.executable, "bench/vs_hf.py", "--baseline", "trl", "--repeats", "1", "--json-out", str(summary)]
    cmd += ["--model", "tiny", "--seq-len", "128", "--samples", str(SAMPLES["dry"])] if dry else [
        "--gpu", "--model", "8b", "--samples", str(SAMPLES["gpu"])]  # fmt: skip
    r = run(cmd, LIMITS_S["vs_trl"], out / "vs_trl.log")
    if summary.exists():
        s = json.loads(summary.read_text())
        r.update(
            {"launcher": s["median"]["launcher"], "trl": s["median"]["hf"], "launcher_over_trl": s["launcher_over_hf"]}
        )
    return r


def plan(measured: dict | None, dry: bool) -> dict:
    """The planner for the launcher's side of vs_trl: one process, packed rows of seq_len, micro batch 2."""
    sys.path.insert(0, str(ROOT))
    from bench.vs_hf import MODELS
    from launcher.demo.builtin import build_tokenizer
    from launcher.plan import planner, throughput

    if dry:  # the built-in tiny model's config
        from launcher.demo import builtin

        cfg = json.loads((builtin.ensure_tiny_llama() / "config.json").read_text())
    else:
        cfg = {"model_type": "llama", **MODELS["8b"], "vocab_size": len(build_tokenizer())}
    arch = planner.Arch.from_config(cfg, "8b" if not dry else "tiny")
    # the launcher's side runs at its defaults: the memory budget and the chunked loss auto, ops fused
    auto = dict(memory_budget_gb="auto", chunked_loss="auto", fused_ops=True)
    s = planner.Setup(micro_batch=2, seq_len=128 if dry else 2048, optimizer="paged_adamw_32bit", gpu=not dry, **auto)
    gpu, device = None, {}
    if not dry:
        import torch

        props = torch.cuda.get_device_properties(0)
        gpu, device = throughput.gpu_named(props.name, props.total_memory / 2**30), {"gpu": props.name}
        s = replace(s, gpu_memory_gb=props.total_memory / 2**30)
    p = planner.estimate(arch, "single", s)
    s = planner.as_planned(s, p)  # the layers kept and the loss chunk the run will use
    out: dict = {**device, "flops_per_token": throughput.flops_per_token(arch, s)}
    out.update(
        {
            "allocated_gb": round(p.allocated, 3),
            "reserved_gb": round(p.reserved, 3),
            "device_gb": round(p.device_total, 3),
        }
    )
    if gpu:
        t = throughput.timing(arch, "single", s, gpu)
        out.update({"gpu_type": gpu.name, "tokens_per_s": round(t.tokens_per_s), "mfu": round(t.mfu, 3)})
    if measured:
        mine = measured["launcher"]
        out["measured"] = {
            "allocated_gb": mine["peak_gb"],
            "reserved_gb": mine["reserved_gb"],
            "tokens_per_s": mine["tokens_per_s"],
        }
        out["planned_over_measured"] = {
            k: round(out[k] / out["measured"][k], 3) for k in ("allocated_gb", "reserved_gb", "tokens_per_s")
            if out.get(k) and out["measured"].get(k)
        }  # fmt: skip
        if gpu:
            for side in ("launcher", "trl"):
                out[f"{side}_mfu"] = round(
                    measured[side]["tokens_per_s"] * out["flops_per_token"] / (gpu.tflops * 1e12), 3
                )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry", action="store_true", help="on this CPU, with the tiny model: everything but the GPU")
    ap.add_argument("--out", default="gpu_acceptance")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "dry": args.dry,
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "steps": {},
    }

    def save():
        (out / "acceptance.json").write_text(json.dumps(report, indent=1))

    save()
    report["steps"]["gpu_tests"] = gpu_tests(out, args.dry)
    save()
    report["steps"]["vs_trl"] = vs_trl(out, args.dry)
    save()
    trl = report["steps"]["vs_trl"]
    report["steps"]["plan"] = plan(trl if "launcher" in trl else None, args.dry)
    save()
    failed = [k for k, v in report["steps"].items() if v.get("rc") or v.get("failures") or v.get("errors")]
    print(json.dumps(report, indent=1))
    if failed:
        print(f"failed: {', '.join(failed)} (logs in {out})", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
