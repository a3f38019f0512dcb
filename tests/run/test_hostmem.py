"""Training processes ask torch's CPU allocator for page-aligned blocks (THP_MEM_ALLOC_ENABLE),
set before torch is imported on every path a run starts from, and a user's own value is kept."""

import json
import os
import subprocess
import sys

# Eight 3 MB tensors, held together: each one's offset from a page boundary (c10 aligns blocks of
# 2 MB and more to the page under THP_MEM_ALLOC_ENABLE, to 64 bytes otherwise).
OFFSETS = "import torch; ts = [torch.empty(3 << 20, dtype=torch.uint8) for _ in range(8)]; " + (
    "print(sorted({t.data_ptr() % 4096 for t in ts}))"
)


def _env(value: str | None = None) -> dict:
    """This environment with THP_MEM_ALLOC_ENABLE unset (conftest sets it), or set to `value`."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    return env if value is None else {**env, "THP_MEM_ALLOC_ENABLE": value}


def _offsets(prelude: str, env_value: str | None = None) -> list[int]:
    env = _env(env_value)
    res = subprocess.run(
        [sys.executable, "-c", prelude + OFFSETS], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_plain_torch_does_not_align_so_the_checks_below_can_fail():
    assert _offsets("") != [0]


def test_the_rank_entry_point_sets_it_before_torch_is_imported():
    # `accelerate launch -m launcher.train` and the sbatch scripts start here
    assert _offsets("import launcher.train; ") == [0]


def test_a_value_the_user_set_is_kept():
    assert _offsets("import launcher.train; ", env_value="0") != [0]


def test_launcher_train_sets_it_before_anything_imports_torch(tmp_path):
    # the in-process path (one process, no accelerate): cmd_train sets it first; a recipe error
    # stops it before the model loads, so torch must not have been imported by then
    code = (
        "import os, sys\nfrom launcher import cli\n"
        f"code = cli.main(['train', 'train.output_dir={tmp_path}', 'train.lr=-1'])\n"
        "print(code, os.environ.get('THP_MEM_ALLOC_ENABLE'), 'torch' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert res.stdout.split() == ["2", "1", "False"], (res.stdout, res.stderr[-2000:])
