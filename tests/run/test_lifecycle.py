"""The life of a run: resume against a changed recipe, damaged checkpoints, unwritable and full disks,
and kill -9 at random moments. Every fault here is real: a truncated or deleted file, a path below a
file, a full tmpfs, SIGKILL."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import launched_rank, run_cli
from safetensors.torch import load_file

# A short demo run: 4 steps, a checkpoint every 2, no eval answers (fast), dropout on (RNG state matters).
SHORT = [
    "train.max_steps=4",
    "train.warmup_steps=0",
    "train.save_every=2",
    "train.keep_checkpoints=5",
    "train.eval_every=1000",
    "train.eval_accuracy_samples=0",
    "train.log_every=1",
    "train.micro_batch_size=8",
    "peft.dropout=0.1",
    "data.max_samples=200",
]


def _steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def _one_error_line(res) -> str:
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    return res.stderr[res.stderr.index("error:") :]


# ---------------------------------------------------------------- the resume contract (no model)


@pytest.mark.parametrize(
    "key, value",
    [
        ("model.name", "builtin:tiny-llama"),
        ("quant.mode", "fp4"),
        ("quant.double_quant", "false"),
        ("peft.r", "8"),
        ("peft.alpha", "16"),
        ("peft.target_modules", "[q_proj,v_proj]"),
        ("peft.method", "ia3"),
        ("data.path", "builtin:arithmetic"),
        ("data.max_seq_len", "64"),
        ("data.packing", "true"),
        ("data.max_samples", "100"),
        ("train.seed", "1"),
        ("train.micro_batch_size", "4"),
        ("train.grad_accum", "2"),
        ("train.lr", "1e-4"),
        ("train.optimizer", "adamw_torch"),
        ("dist.nproc", "2"),
        ("dist.strategy", "zero2"),
    ],
)
def test_resume_refuses_a_key_that_changes_the_checkpoint(key, value):
    from launcher.config.recipe import load_recipe
    from launcher.run import resume

    old = resume.flat(load_recipe(None, ["dist.strategy=ddp"]).model_dump(mode="json"))
    new = resume.flat(load_recipe(None, ["dist.strategy=ddp", f"{key}={value}"]).model_dump(mode="json"))
    refused, accepted = resume.changes(old, new)
    assert [line.split(":")[0] for line in refused] == [key] and accepted == []
    assert refused[0].startswith(f"{key}: {old[key] if old[key] is not None else 'null'} -> ")


@pytest.mark.parametrize(
    "key, value",
    [
        ("train.max_steps", "3000"),
        ("train.epochs", "2"),
        ("train.eval_every", "100"),
        ("train.log_every", "1"),
        ("train.save_every", "50"),
        ("train.keep_checkpoints", "7"),
        ("train.eval_accuracy_samples", "10"),
        ("train.memory_budget_gb", "2.0"),
        ("train.gradient_checkpointing", "false"),
        ("slurm.time", "02:00:00"),
        ("slurm.partition", "gpu"),
        ("data.log_sample_ids", "true"),
    ],
)
def test_resume_accepts_a_key_that_is_safe_to_change(key, value):
    from launcher.config.recipe import load_recipe
    from launcher.run import resume

    old = resume.flat(load_recipe(None, []).model_dump(mode="json"))
    new = resume.flat(load_recipe(None, [f"{key}={value}"]).model_dump(mode="json"))
    refused, accepted = resume.changes(old, new)
    assert refused == [] and [line.split(":")[0] for line in accepted] == [key]


def test_every_schema_key_is_either_safe_or_refused_by_default():
    """A key nobody classified is refused (never silently accepted): SAFE names only real keys."""
    from launcher.config.recipe import load_recipe
    from launcher.run import resume

    keys = set(resume.flat(load_recipe(None, []).model_dump(mode="json")))
    assert resume.SAFE <= keys


# ---------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The short demo run, trained once: step_0000002 and step_0000004 checkpoints."""
    run = tmp_path_factory.mktemp("lifecycle") / "run"
    res = run_cli("train", f"train.output_dir={run}", *SHORT)
    assert res.returncode == 0, res.stderr[-3000:]
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    # the copy must say where it is: recipe.yaml names the original output_dir
    text = (dest / "recipe.yaml").read_text().replace(str(run), str(dest))
    (dest / "recipe.yaml").write_text(text)
    return dest


@pytest.mark.slow
def test_resume_with_a_changed_adapter_shape_is_one_error_naming_it(trained, tmp_path):
    run = _copy(trained, tmp_path)
    before = {name: (run / name).read_text() for name in ("metrics.jsonl", "recipe.yaml")}
    res = run_cli("train", f"train.output_dir={run}", *SHORT, "peft.r=8", "model.name=builtin:tiny-llama", "--resume")
    text = _one_error_line(res)
    assert "peft.r: 16 -> 8" in text and "model.name: builtin:tiny-math -> builtin:tiny-llama" in text
    assert {name: (run / name).read_text() for name in before} == before  # nothing touched


@pytest.mark.slow
def test_resume_extends_the_run_and_logs_each_step_once(trained, tmp_path):
    run = _copy(trained, tmp_path)
    # as if killed after step 4's checkpoint was written but with steps 5-6 logged: they are done again
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 9.0}) + "\n" + json.dumps({"step": 6, "loss": 9.0}) + "\n")
    res = run_cli("train", f"train.output_dir={run}", *SHORT, "train.max_steps=6", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming with changes: train.max_steps: 4 -> 6" in res.stdout
    assert _steps(run) == [1, 2, 3, 4, 5, 6]
    assert 9.0 not in [json.loads(line).get("loss") for line in (run / "metrics.jsonl").read_text().splitlines()]


class _RunsCode:
    """Unpickling it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated weights", "optimizer gone", "changed byte", "planted pickle"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, damage):
    """A planted pickle: accelerate unpickles custom_checkpoint_N.pkl with weights_only=False (code runs)
    and the launcher never writes one: a file the manifest does not list makes the checkpoint damaged."""
    run = _copy(trained, tmp_path)
    newest, marker = run / "checkpoints" / "step_0000004", tmp_path / "marker"
    if damage == "planted pickle":
        (newest / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_RunsCode(marker)))
    elif damage == "truncated weights":
        _truncate(newest / "model.safetensors")
    elif damage == "optimizer gone":
        (newest / "optimizer.bin").unlink()
    else:
        data = bytearray((newest / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (newest / "model.safetensors").write_bytes(bytes(data))
    res = run_cli("train", f"train.output_dir={run}", *SHORT, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert f"checkpoint {newest} is damaged" in out and "resuming from" in out and "step_0000002 instead" in out
    assert f"resumed from {run / 'checkpoints' / 'step_0000002'} at step 2" in out
    assert _steps(run) == [1, 2, 3, 4]  # steps 3-4 once, though the first run logged them too
    assert "Traceback" not in res.stderr and not marker.exists()


@pytest.mark.slow
def test_a_checkpoint_whose_progress_is_a_pickle_is_refused_in_one_line(trained, tmp_path):
    """A checkpoint from before progress.json held the progress (an older launcher kept it in accelerate's
    pickles): refused in one line, never unpickled, nothing touched."""
    from launcher.run import checkpoint

    run = _copy(trained, tmp_path)
    for folder in checkpoint.list_complete(run):
        meta = json.loads((folder / "progress.json").read_text())
        (folder / "progress.json").write_text(json.dumps({k: meta[k] for k in ("step", "epoch", "eval_loss")}))
        (folder / "manifest.json").write_text(json.dumps(checkpoint.manifest_of(folder)))
    before = (run / "metrics.jsonl").read_text()
    text = _one_error_line(run_cli("train", f"train.output_dir={run}", *SHORT, "--resume"))
    assert "was written by an older launcher" in text and "step_0000004" in text
    assert (run / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_no_intact_checkpoint_is_refused_naming_each(trained, tmp_path):
    run = _copy(trained, tmp_path)
    for step in ("step_0000002", "step_0000004"):
        _truncate(run / "checkpoints" / step / "model.safetensors")
    text = _one_error_line(run_cli("train", f"train.output_dir={run}", *SHORT, "--resume"))
    assert "no intact checkpoint" in text and "step_0000002: model.safetensors has" in text
    assert "step_0000004: model.safetensors has" in text


def test_a_checkpoint_proves_itself_after_a_real_save(trained):
    """What the run wrote carries a manifest that matches it; no temporary folder is left."""
    from launcher.run import checkpoint

    folders = sorted(p.name for p in (trained / "checkpoints").iterdir())
    assert folders == ["step_0000002", "step_0000004"]
    for folder in folders:
        path = trained / "checkpoints" / folder
        assert checkpoint.damage(path) is None
        manifest = json.loads((path / checkpoint.MANIFEST).read_text())
        assert {"model.safetensors", "optimizer.bin", "progress.json"} <= set(manifest)


# ---------------------------------------------------------------- paths and disks


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_an_output_dir_that_cannot_be_a_directory_fails_before_loading(tmp_path, where):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "a file" else tmp_path / "f" / "run"
    res = run_cli("train", f"train.output_dir={out}", *SHORT, timeout=120)
    text = _one_error_line(res)
    assert "train.output_dir" in text and "is a file" in text
    assert "loading" not in res.stdout  # refused before the model loads


def test_a_cache_that_cannot_be_created_is_one_error_naming_it(tmp_path):
    (tmp_path / "f").write_text("x")
    env = {**os.environ, "LAUNCHER_CACHE": str(tmp_path / "f" / "cache")}
    res = subprocess.run(
        [sys.executable, "-m", "launcher", "train", f"train.output_dir={tmp_path / 'run'}", *SHORT],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert "LAUNCHER_CACHE" in _one_error_line(res)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 16 MiB tmpfs, room for a few of the demo's 2 MB checkpoints (skipped, with the reason, where
    mounting is not permitted)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_a_disk_that_fills_during_the_run_is_one_line_and_keeps_the_checkpoints(small_tmpfs):
    run = small_tmpfs / "run"
    args = [sys.executable, "-m", "launcher", "train", f"train.output_dir={run}", *SHORT]
    args += ["train.max_steps=400", "train.save_every=1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_0000002").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as f:  # fill what is left, as another job on the same disk would
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    out, err = proc.communicate(timeout=300)
    res = subprocess.CompletedProcess(args, proc.returncode, out, err)
    text = _one_error_line(res)
    assert "No space left on device" in text and "resume with: launcher train" in text and "--resume" in text
    assert "newest intact checkpoint: step_" in text
    from launcher.run import checkpoint

    kept = checkpoint.list_complete(run)
    assert kept and all(checkpoint.damage(p) is None for p in kept)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # the partial one is gone
    # after freeing space, the printed command resumes
    filler.unlink()
    cmd = text.split("resume with: ")[1].split()
    res = run_cli(*cmd[1:], "train.max_steps=12")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _steps(run) == list(range(1, 13))


# ---------------------------------------------------------------- chaos


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_one_uninterrupted_run(tmp_path):
    """SIGKILL the run at random moments (mid-step and mid-save: it saves every step) over a run that
    crosses epoch boundaries, resume each time; the final adapter equals one uninterrupted run's and
    every step is logged once."""
    chaos = [
        "train.max_steps=24",
        "train.warmup_steps=0",
        "train.save_every=1",
        "train.keep_checkpoints=2",
        "train.eval_every=1000",
        "train.eval_accuracy_samples=0",
        "train.log_every=1",
        "train.micro_batch_size=16",
        "train.grad_accum=2",
        "peft.dropout=0.1",
        "data.max_samples=150",  # 142 training samples: about 4.5 steps an epoch, 5 epochs
    ]
    ref = tmp_path / "ref"
    res = run_cli("train", f"train.output_dir={ref}", *chaos)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "chaos"
    seed = int(os.environ.get("CHAOS_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    kills = 0
    for attempt in range(12):
        args = [sys.executable, "-m", "launcher", "train", f"train.output_dir={run}", *chaos]
        args += ["--resume"] if attempt else []
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if kills < 3:
            start = len(_steps(run)) if (run / "metrics.jsonl").exists() else 0
            deadline = time.time() + 300
            while proc.poll() is None and time.time() < deadline:  # wait for the first new step
                if (run / "metrics.jsonl").exists() and len(_steps(run)) > start:
                    break
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.6))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
                kills += 1
                continue
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        if (run / "summary.json").exists():
            break
    assert kills >= 1 and (run / "summary.json").exists()
    wa, wb = load_file(ref / "adapter_model.safetensors"), load_file(run / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and wa
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"chaos: CHAOS_SEED={seed}, {kills} kills, max |diff| {diff:g}")  # -s shows it; a failure names the seed
    assert diff <= 1e-6, (seed, diff)
    assert _steps(run) == list(range(1, 25))
    assert json.loads((run / "summary.json").read_text())["steps"] == 24
    assert torch.equal(torch.tensor(_steps(ref)), torch.tensor(_steps(run)))


# ---------------------------------------------------------------- a frozen rank


@pytest.mark.slow
def test_a_frozen_rank_ends_the_run_within_the_timeout_naming_it_then_resume_finishes(tmp_path):
    """SIGSTOP rank 1 of a 2-process DDP run (a wedged GPU or a stuck filesystem looks like this): the
    run ends within dist.timeout_s + 30 s with one line naming rank 1; --resume then finishes."""

    from launcher.run import checkpoint

    run, timeout = tmp_path / "run", 15
    args = ["dist.nproc=2", f"train.output_dir={run}", *SHORT, "train.max_steps=40", f"dist.timeout_s={timeout}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    victim = None
    try:
        deadline = time.time() + 300
        while checkpoint.newest(run) is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert checkpoint.newest(run) is not None, proc.communicate(timeout=60)[1][-3000:]
        victim = launched_rank(proc.pid, 1)
        victim.send_signal(signal.SIGSTOP)
        frozen = time.time()
        _, err = proc.communicate(timeout=timeout + 120)
        took = time.time() - frozen
    finally:
        proc.kill()
        if victim is not None and victim.is_running():
            victim.kill()
    assert proc.returncode not in (0, None), err[-3000:]
    print(f"frozen rank: the run ended {took:.1f} s after SIGSTOP (dist.timeout_s={timeout})")
    assert took <= timeout + 30, (took, err[-3000:])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    line = errors[0]
    assert f"dist.timeout_s={timeout} s" in line and f"rank 1 (pid {victim.pid} on " in line, line
    assert "newest intact checkpoint: step_" in line and "--resume" in line, line
    res = run_cli("train", *args, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 40
    assert _steps(run) == list(range(1, 41))


@pytest.mark.slow
def test_with_max_restarts_a_killed_rank_is_restarted_from_the_checkpoint_in_the_job(tmp_path):
    """dist.max_restarts=1: SIGKILL of rank 1 mid-run; torchrun restarts both ranks, they continue
    from the newest intact checkpoint, and the launch ends 0 with every step logged once."""
    from launcher.run import checkpoint

    run = tmp_path / "run"
    args = ["dist.nproc=2", f"train.output_dir={run}", *SHORT, "train.max_steps=40", "dist.max_restarts=1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 300
        while checkpoint.newest(run) is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert checkpoint.newest(run) is not None, proc.communicate(timeout=60)[1][-3000:]
        launched_rank(proc.pid, 1).send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["restarts"] == 1, summary
    assert "resumed from" in out + err
    assert _steps(run) == list(range(1, 41))
