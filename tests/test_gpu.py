"""GPU paths (paged optimizer in unified memory, bf16 autocast, device_map). Skipped without CUDA."""

import json

import pytest

from conftest import requires_gpu, run_cli

pytestmark = [pytest.mark.gpu, requires_gpu]


def test_gpu_demo_run_with_paged_optimizer(tmp_path):
    run = tmp_path / "gpu"
    res = run_cli("train", f"train.output_dir={run}", "train.max_steps=50", "train.optimizer=paged_adamw_8bit",
                  "train.eval_every=50")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert 0 < max(r.get("peak_mem_gb", 0) for r in rows) < 2  # CUDA allocation, not host RSS
