"""Schema: examples validate, broken recipes fail at once with exit 2 and the dotted path."""

import pytest
from conftest import ROOT, run_cli

from launcher.config.errors import UserError
from launcher.config.recipe import Recipe, describe_fields, load_recipe

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_builtin_default_validates():
    r = load_recipe()
    assert r.model.name == "builtin:tiny-math" and r.data.path == "builtin:subtraction"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path):
    assert isinstance(load_recipe(str(path)), Recipe)


def test_there_are_examples():
    assert len(EXAMPLES) >= 2


def test_overrides_apply_with_types():
    r = load_recipe(
        None, ["train.lr=1e-4", "peft.r=32", "peft.target_modules=[q_proj,v_proj]", "data.max_samples=null"]
    )
    assert r.train.lr == 1e-4 and r.peft.r == 32 and r.peft.target_modules == ["q_proj", "v_proj"]
    assert r.data.max_samples is None


def test_lora_is_an_alias_of_peft():
    assert load_recipe(None, ["lora.r=8"]).peft.r == 8


def _problems(tmp_path, text, *overrides):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(UserError) as e:
        load_recipe(str(p), list(overrides))
    return str(e.value)


BASE = "model: {name: builtin:tiny-llama}\ndata: {path: builtin:arithmetic}\n"


def test_all_problems_reported_at_once_with_paths(tmp_path):
    msg = _problems(tmp_path, BASE + "train: {lr: -1, micro_batch_size: 0, optimizr: adamw_torch}\npeft: {r: x}\n")
    assert "4 problems" in msg
    assert "train.lr:" in msg and "train.micro_batch_size:" in msg and "peft.r:" in msg
    assert "train.optimizr: unknown key; did you mean train.optimizer?" in msg


def test_unknown_section_lists_valid_ones(tmp_path):
    msg = _problems(tmp_path, BASE + "trainer: {lr: 1}\n")
    assert "trainer: unknown key; did you mean train?" in msg


def test_missing_required_and_bad_literal(tmp_path):
    msg = _problems(tmp_path, "data: {path: x.jsonl}\nquant: {mode: nf5}\n")
    assert "model: required" in msg and "quant.mode:" in msg and "nf4" in msg


def test_cross_field_checks(tmp_path):
    msg = _problems(
        tmp_path,
        BASE,
        "peft.method=prefix_tuning",
    )
    assert "train.gradient_checkpointing=false" in msg
    assert "quant.mode=none" in _problems(tmp_path, BASE, "peft.method=loha")
    assert "dist.strategy" in _problems(tmp_path, BASE, "dist.strategy=single", "dist.nproc=2")
    assert "train.warmup_steps" in _problems(tmp_path, BASE, "train.max_steps=5", "train.warmup_steps=5")


def test_yaml_errors_and_missing_file(tmp_path):
    assert "not valid YAML" in _problems(tmp_path, "model: [unclosed\n")
    assert "mapping of sections" in _problems(tmp_path, "- a\n- b\n")
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(str(tmp_path / "nope.yaml"))
    with pytest.raises(UserError, match="section.key=value"):
        load_recipe(None, ["train.lr"])


def test_fields_describe_every_key():
    text = describe_fields()
    for key in ("train.lr", "peft.target_modules", "quant.storage_dtype", "slurm.gpus_per_node", "dist.strategy"):
        assert key in text


@pytest.mark.parametrize(
    "args, path",
    [
        (["train", "train.lr=-1"], "train.lr"),
        (["train", "train.mirco_batch_size=1"], "did you mean train.micro_batch_size?"),
        (["validate", "missing.yaml"], "recipe file not found"),
        (["train", "peft.method=loha"], "peft.method"),
    ],
)
def test_cli_exit_2_one_line_and_nothing_written(tmp_path, args, path):
    res = run_cli(*args, f"train.output_dir={tmp_path / 'out'}" if args[0] == "train" else "train.seed=1", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert path in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_cli_validate_prints_resolved_recipe(tmp_path):
    res = run_cli("validate", "peft.r=8")
    assert res.returncode == 0 and "r: 8" in res.stdout and "builtin:tiny-math" in res.stdout
