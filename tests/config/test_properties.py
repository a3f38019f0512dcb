"""Property tests of everything that parses user input or renders it into a script.

Arbitrary text, bytes and structures go in; the only outcomes allowed are a valid result or a
`UserError` (exit 2, one clear message), and a generated script never gains a line or a shell
word that the launcher did not write.
"""

from __future__ import annotations

import shlex
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.cluster import slurm
from launcher.config.errors import UserError
from launcher.config.recipe import DataCfg, Recipe, load_recipe
from launcher.config.userio import dump_yaml
from launcher.demo import builtin
from launcher.run import data

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
GOOD = "model:\n  name: builtin:tiny-llama\ndata:\n  path: builtin:arithmetic\n"
# Text that reaches the edges: controls, quotes, shell and YAML syntax, non-ASCII, surrogates excluded.
NASTY = st.text(
    st.one_of(st.sampled_from(list("\n\r\t\x00\x0b\x1b '\"\\`$;&|<>(){}[]*!#%:,-=.~@ ")), st.characters(codec="utf-8")),
    max_size=40,
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(
    [
        "model.name",
        "train.lr",
        "train.epochs",
        "slurm.time",
        "slurm.constraint",
        "peft.r",
        "data.path",
        "train.output_dir",
        "slurm.sbatch_extra.x",
        "peft.target_modules",
        "lora.r",
        "dist.strategy",
        "train.max_grad_norm",
        "slurm.partition",
        "model.device_map",
    ]
)


def _recipe_or_user_error(fn):
    try:
        result = fn()
    except UserError as e:
        assert str(e).strip(), "an error with no message"
        return None
    assert isinstance(result, Recipe)
    return result


@SETTINGS
@given(text=NASTY | st.text(max_size=200))
def test_any_recipe_text_is_a_recipe_or_a_user_error(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD + text, encoding="utf-8", errors="surrogatepass")
    _recipe_or_user_error(lambda: load_recipe(str(path)))
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _recipe_or_user_error(lambda: load_recipe(str(path)))


@SETTINGS
@given(blob=st.binary(max_size=200))
def test_any_recipe_bytes_are_a_recipe_or_a_user_error(tmp_path, blob):
    path = tmp_path / "r.yaml"
    path.write_bytes(GOOD.encode() + blob)
    _recipe_or_user_error(lambda: load_recipe(str(path)))


@SETTINGS
@given(
    tree=st.dictionaries(
        st.sampled_from(["model", "data", "train", "slurm", "peft", "lora", "dist", "x"]), JSON, max_size=5
    )
)
def test_any_yaml_structure_is_a_recipe_or_a_user_error(tmp_path, tree):
    path = tmp_path / "r.yaml"
    path.write_text(dump_yaml({"model": {"name": "m"}, "data": {"path": "p"}, **tree}))
    _recipe_or_user_error(lambda: load_recipe(str(path)))


@SETTINGS
@given(key=KEYS | st.text(max_size=20), value=NASTY)
def test_any_override_is_applied_or_refused(key, value):
    recipe = _recipe_or_user_error(lambda: load_recipe(None, [f"{key}={value}"]))
    if recipe is not None and key in ("model.name", "slurm.constraint", "data.path") and "=" not in key:
        assert getattr(getattr(recipe, key.split(".")[0]), key.split(".")[1]) == value  # text fields keep their text


@SETTINGS
@given(blob=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json"]))
def test_any_data_file_reads_as_objects_or_a_user_error(tmp_path, blob, suffix):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(blob)
    try:
        rows = data.read_samples(str(path))
    except UserError as e:
        assert "data.path" in str(e)
    else:
        assert rows and all(isinstance(r, dict) for r in rows)


@pytest.fixture(scope="module")
def tokenizer():
    return builtin.build_tokenizer()


@SETTINGS
@given(
    rows=st.lists(
        st.dictionaries(
            st.sampled_from(["prompt", "completion", "messages", "text", "instruction", "output", "input"]),
            JSON,
            min_size=1,
            max_size=4,
        ),
        min_size=1,
        max_size=4,
    ),
    fmt=st.sampled_from(["auto", "prompt_completion", "alpaca", "chat", "text"]),
)
def test_any_samples_tokenize_or_give_a_user_error(tokenizer, rows, fmt):
    cfg = DataCfg(path="x.jsonl", format=fmt, max_seq_len=64)
    try:
        out = data.tokenize(rows, cfg, tokenizer)
    except UserError as e:
        assert "data" in str(e)
    else:
        for ex in out.examples:
            assert len(ex["input_ids"]) == len(ex["labels"]) <= 64


# --- generated scripts ------------------------------------------------------------------------

SCRIPT_FIELDS = [
    "slurm.partition",
    "slurm.account",
    "slurm.qos",
    "slurm.constraint",
    "slurm.mem",
    "slurm.job_name",
    "slurm.time",
    "train.output_dir",
    "slurm.sbatch_extra.comment",
    "slurm.sbatch_extra",
]
SAFE = {
    "slurm.mem": "8G",
    "slurm.time": "01:00:00",
    "train.output_dir": "/tmp/safe-run",
    "slurm.sbatch_extra": {"comment": "x"},
}


def _scripts(field: str, value, setup: list[str]) -> list[str]:
    """plain.sbatch and the script submitit submits, for a recipe with `field` set to `value`."""
    flags = {field: ("flag", value)}
    if field != "train.output_dir":
        flags["train.output_dir"] = ("flag", SAFE["train.output_dir"])
    recipe = load_recipe(None, [], flags)
    recipe.slurm.setup = setup
    recipe, shape = slurm.resolve(recipe)
    run_dir = Path(recipe.train.output_dir)
    config = run_dir / "launch" / "accelerate_configs" / "ddp.yaml"
    prepared = slurm.Prepared(recipe, shape, run_dir, config, slurm.executor_parameters(recipe, shape))
    return [slurm.plain_sbatch(recipe, shape, run_dir, config), slurm.sbatch_text(prepared)]


def _shape_of(script: str) -> list:
    """Per line: a comment/#SBATCH line, or the number of shell words (and of the words inside `bash -c`)."""
    shape = []
    for line in script.split("\n"):
        if line.lstrip().startswith("#") or not line.strip():
            shape.append("#")
            continue
        words = shlex.split(line, comments=True)
        inner = [len(shlex.split(w)) for w in words if w.startswith(("trap ", "exec "))]
        shape.append((len(words), *inner))
    return shape


@SETTINGS
@given(
    field=st.sampled_from(SCRIPT_FIELDS),
    value=NASTY | st.text(string.printable, max_size=30),
    setup=st.lists(st.sampled_from(["module load cuda", "source env.sh; echo 'a b'"]), max_size=2),
)
def test_rendered_scripts_never_gain_a_line_or_a_word(field, value, setup):
    if field == "slurm.sbatch_extra":
        value = {value: "1"}
    safe = SAFE.get(field, "x")
    baseline = [_shape_of(s) for s in _scripts(field, safe, setup)]
    try:
        scripts = _scripts(field, value, setup)
    except UserError:
        return
    assert [_shape_of(s) for s in scripts] == baseline, (field, value)
    for script in scripts:
        for line in script.split("\n"):
            assert not any(c in line for c in "\r\x00\x0b\x0c"), repr(line)
