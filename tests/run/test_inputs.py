"""Inputs as users hand them over: a BOM-prefixed JSONL, a named pipe, a model with its own code."""

from __future__ import annotations

import json
import os

from conftest import run_cli

ROWS = [{"prompt": f"{a}-{b}=", "completion": str(a - b)} for a in range(20, 40) for b in range(5)]


def test_a_jsonl_file_with_a_utf8_bom_reads_like_one_without(tmp_path):
    """What Windows editors save: the BOM is no content (it was refused as invalid JSON on line 1)."""
    text = "".join(json.dumps(r) + "\n" for r in ROWS)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "plain.jsonl").write_text(text)
    stats = []
    for name in ("bom.jsonl", "plain.jsonl"):
        res = run_cli("preprocess", f"data.path={tmp_path / name}", f"data.cache_dir={tmp_path / name}.cache")
        assert res.returncode == 0, res.stderr[-2000:]
        stats.append(json.loads(res.stdout.strip().splitlines()[-1]))
    assert stats[0] == stats[1]


def test_a_named_pipe_as_data_is_named_as_such(tmp_path):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    res = run_cli("preprocess", f"data.path={fifo}", timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "data.path" in res.stderr and "not a regular file" in res.stderr, res.stderr
    assert "file not found" not in res.stderr


def test_a_model_with_its_own_code_names_trust_remote_code(tmp_path):
    """A local model directory whose tokenizer names a custom class (auto_map), loaded with
    model.trust_remote_code false: the error says which key to set."""
    from launcher.demo import builtin

    model = builtin.write_random_llama(tmp_path / "custom", **builtin.TINY_CONFIG)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    cfg["tokenizer_class"] = "CustomTokenizer"
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    (model / "tokenization_custom.py").write_text("raise SystemExit('custom code ran')\n")
    res = run_cli("preprocess", f"model.name={model}", timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "model.trust_remote_code=true" in res.stderr, res.stderr
    assert "custom code ran" not in res.stdout + res.stderr


def test_a_truncated_weights_file_is_one_error_naming_the_model(tmp_path):
    from launcher.demo import builtin

    model = builtin.write_random_llama(tmp_path / "cut", **builtin.TINY_CONFIG)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    run = tmp_path / "run"
    args = [f"model.name={model}", f"train.output_dir={run}", "train.max_steps=1", "train.warmup_steps=0"]
    res = run_cli("train", *args, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.name" in errors[0] and "damaged" in errors[0], res.stderr[-2000:]
