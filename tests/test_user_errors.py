"""A corpus of user mistakes across every command: each ends with exit 2 and a short message that
names the field, flag or file to fix, never a traceback and never an echo of the whole input.

The commands run in this process (`launcher.cli.main`), so the ~90 cases take seconds; every case
fails before anything heavy starts, which is itself part of what is checked.
"""

from __future__ import annotations

import json

import pytest

from launcher.cli import main

GOOD = "model:\n  name: builtin:tiny-llama\ndata:\n  path: builtin:arithmetic\n"
ROW = '{"prompt": "1+1=", "completion": "2"}\n'
BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    )
    + "model:\n  name: *i\n"
)
ADAPTER = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}


def _run_dir(recipe_text: str | bytes = GOOD, adapter=json.dumps(ADAPTER), weights: bytes | None = b"junk") -> dict:
    files = {"run/recipe.yaml": recipe_text, "run/adapter_config.json": adapter}
    if weights is not None:
        files["run/adapter_model.safetensors"] = weights
    return files


def _result(**row) -> str:
    base = {
        "model": "m",
        "strategy": "ddp",
        "world": 2,
        "micro_batch_size": 1,
        "seq_len": 64,
        "params": 1000,
        "tokens_per_s": 10.0,
        "tokens_per_s_per_gpu": 5.0,
        "peak_mem_gb": 1.0,
    }
    return json.dumps({k: v for k, v in {**base, **row}.items() if v is not None})


# (name, argv ({d} is the case's directory), files to write first, words the message must contain)
CASES = [
    # --- recipes (validate) ---
    ("recipe_not_utf8", ["validate", "{d}/r.yaml"], {"r.yaml": b"model:\n  name: \xff\n"}, ["r.yaml line 2", "UTF-8"]),
    (
        "recipe_duplicate_key",
        ["validate", "{d}/r.yaml"],
        {"r.yaml": GOOD + "model:\n  name: x\n"},
        ["r.yaml line 5", "duplicate key 'model'"],
    ),
    ("recipe_alias_bomb", ["validate", "{d}/r.yaml"], {"r.yaml": BOMB}, ["r.yaml line", "aliases"]),
    ("recipe_bad_yaml", ["validate", "{d}/r.yaml"], {"r.yaml": "model: [unclosed\n"}, ["r.yaml", "not valid YAML"]),
    ("recipe_is_a_list", ["validate", "{d}/r.yaml"], {"r.yaml": "- a\n- b\n"}, ["mapping of sections"]),
    ("recipe_is_a_directory", ["validate", "{d}"], {}, ["is a directory"]),
    ("recipe_missing", ["validate", "{d}/nope.yaml"], {}, ["nope.yaml", "not found"]),
    ("recipe_empty", ["validate", "{d}/r.yaml"], {"r.yaml": ""}, ["model: required", "data: required"]),
    ("recipe_section_not_mapping", ["validate", "{d}/r.yaml"], {"r.yaml": GOOD + "train: 5\n"}, ["train"]),
    ("recipe_two_documents", ["validate", "{d}/r.yaml"], {"r.yaml": GOOD + "---\n" + GOOD}, ["not valid YAML"]),
    (
        "recipe_python_tag",
        ["validate", "{d}/r.yaml"],
        {"r.yaml": "model: !!python/object:os.system x\n"},
        ["r.yaml line 1", "not valid YAML"],
    ),
    ("recipe_inf_lr", ["validate", "{d}/r.yaml"], {"r.yaml": GOOD + "train:\n  lr: .inf\n"}, ["train.lr", "finite"]),
    ("recipe_huge_float", ["validate", "train.lr=1e400"], {}, ["train.lr", "finite"]),
    ("recipe_bad_time", ["validate", "{d}/r.yaml"], {"r.yaml": GOOD + "slurm:\n  time: soon\n"}, ["slurm.time"]),
    ("recipe_time_as_list", ["validate", "{d}/r.yaml"], {"r.yaml": GOOD + "slurm:\n  time: [1]\n"}, ["slurm.time"]),
    # --- overrides ---
    ("override_typo", ["validate", "train.lrr=1"], {}, ["train.lrr", "did you mean train.lr"]),
    ("override_nan_epochs", ["validate", "train.epochs=.nan"], {}, ["train.epochs", "finite"]),
    ("override_negative_lr", ["validate", "train.lr=-1"], {}, ["train.lr"]),
    ("override_zero_batch", ["validate", "train.micro_batch_size=0"], {}, ["train.micro_batch_size"]),
    ("override_text_for_int", ["validate", "peft.r=abc"], {}, ["peft.r"]),
    ("override_short_seq", ["validate", "data.max_seq_len=4"], {}, ["data.max_seq_len"]),
    ("override_bad_strategy", ["validate", "dist.strategy=bogus"], {}, ["dist.strategy"]),
    ("override_no_equals", ["validate", "{d}/r.yaml", "train.lr"], {"r.yaml": GOOD}, ["train.lr", "section.key=value"]),
    ("override_empty_part", ["validate", "train..lr=1"], {}, ["section.key=value"]),
    ("override_alias", ["validate", "train.lr=*x"], {}, ["train.lr", "aliases"]),
    ("override_time_zero", ["validate", "slurm.time=0"], {}, ["slurm.time"]),
    ("override_time_garbage", ["validate", "slurm.time=1:2:3:4"], {}, ["slurm.time"]),
    ("override_huge_value", ["validate", "model.nmae=" + "x" * 100_000], {}, ["model.nmae", "did you mean"]),
    ("override_bool_as_text", ["validate", "train.gradient_checkpointing=maybe"], {}, ["train.gradient_checkpointing"]),
    ("override_stray_flag", ["validate", "--frob"], {}, ["--frob"]),
    ("unknown_command", ["frobnicate"], {}, ["frobnicate"]),
    # --- configs ---
    (
        "configs_device_map_zero3",
        ["configs", "dist.strategy=zero3", "dist.nproc=2", "model.device_map=auto", "--out", "{d}/c"],
        {},
        ["model.device_map"],
    ),
    ("configs_bad_device", ["configs", "--device", "tpu"], {}, ["--device"]),
    (
        "configs_chunked_loss_under_zero3",
        ["configs", "dist.strategy=zero3", "dist.nproc=2", "train.chunked_loss=512", "--out", "{d}/c"],
        {},
        ["train.chunked_loss", "zero3"],
    ),
    (
        "configs_compile_under_fsdp",
        ["configs", "dist.strategy=fsdp", "dist.nproc=2", "train.compile=true", "--out", "{d}/c"],
        {},
        ["train.compile", "fsdp", "false"],
    ),
    ("validate_checkpoint_every_zero", ["validate", "train.checkpoint_every=0"], {}, ["train.checkpoint_every"]),
    (
        "validate_budget_without_checkpointing",
        ["validate", "train.memory_budget_gb=40", "train.gradient_checkpointing=false"],
        {},
        ["train.memory_budget_gb", "train.gradient_checkpointing=true"],
    ),
    ("validate_budget_negative", ["validate", "train.memory_budget_gb=-1"], {}, ["train.memory_budget_gb"]),
    ("configs_zero_nproc", ["configs", "dist.nproc=0", "--out", "{d}/c"], {}, ["dist.nproc"]),
    # --- plan ---
    ("plan_zero_gpu_memory", ["plan", "--gpu-memory", "0"], {}, ["--gpu-memory"]),
    ("plan_text_gpu_memory", ["plan", "--gpu-memory", "lots"], {}, ["--gpu-memory"]),
    ("plan_nan_gpu_memory", ["plan", "--gpu-memory", "nan"], {}, ["--gpu-memory"]),
    ("plan_negative_cpu_memory", ["plan", "--cpu-memory=-5GB"], {}, ["--cpu-memory"]),
    ("plan_zero_nodes", ["plan", "--nodes", "0"], {}, ["--nodes"]),
    ("plan_negative_gpus", ["plan", "--gpus-per-node=-1"], {}, ["--gpus-per-node"]),
    ("plan_unknown_preset", ["plan", "--model", "llama-650b"], {}, ["--model", "llama-650b"]),
    # --- submit --dry-run ---
    ("submit_zero_nodes", ["submit", "--dry-run", "--nodes", "0", "train.output_dir={d}/run"], {}, ["--nodes"]),
    (
        "submit_negative_gpus",
        ["submit", "--dry-run", "--gpus-per-node=-1", "train.output_dir={d}/run"],
        {},
        ["--gpus-per-node"],
    ),
    ("submit_bad_time", ["submit", "--dry-run", "--time", "1:2:3:4", "train.output_dir={d}/run"], {}, ["--time"]),
    ("submit_negative_time", ["submit", "--dry-run", "--time=-5", "train.output_dir={d}/run"], {}, ["--time"]),
    (
        "submit_newline_partition",
        ["submit", "--dry-run", "--partition", "gpu\ntouch {d}/pwned", "train.output_dir={d}/run"],
        {},
        ["slurm.partition", "'\\n'"],
    ),
    (
        "submit_newline_output_dir",
        ["submit", "--dry-run", "train.output_dir={d}/run\ntouch {d}/pwned"],
        {},
        ["train.output_dir"],
    ),
    ("submit_space_output_dir", ["submit", "--dry-run", "train.output_dir={d}/my run"], {}, ["train.output_dir"]),
    ("submit_percent_output_dir", ["submit", "--dry-run", "train.output_dir={d}/run%j"], {}, ["train.output_dir", "%"]),
    (
        "submit_semicolon_account",
        ["submit", "--dry-run", "--account", "a;reboot", "train.output_dir={d}/run"],
        {},
        ["slurm.account"],
    ),
    (
        "submit_subshell_mem",
        ["submit", "--dry-run", "--mem", "$(reboot)", "train.output_dir={d}/run"],
        {},
        ["slurm.mem"],
    ),
    (
        "submit_space_job_name",
        ["submit", "--dry-run", "slurm.job_name=my job", "train.output_dir={d}/run"],
        {},
        ["slurm.job_name"],
    ),
    ("submit_sbatch_no_name", ["submit", "--dry-run", "--sbatch", "=x", "train.output_dir={d}/run"], {}, ["--sbatch"]),
    (
        "submit_sbatch_bad_name",
        ["submit", "--dry-run", "--sbatch", "bad name=1", "train.output_dir={d}/run"],
        {},
        ["slurm.sbatch_extra"],
    ),
    (
        "submit_sbatch_space_value",
        ["submit", "--dry-run", "--sbatch", "comment=a b", "train.output_dir={d}/run"],
        {},
        ["slurm.sbatch_extra.comment"],
    ),
    (
        "submit_sbatch_owned",
        ["submit", "--dry-run", "--sbatch", "nodes=2", "train.output_dir={d}/run"],
        {},
        ["slurm.sbatch_extra.nodes"],
    ),
    (
        "submit_sbatch_list_value",
        ["submit", "--dry-run", "slurm.sbatch_extra.exclude=[a, b]", "train.output_dir={d}/run"],
        {},
        ["slurm.sbatch_extra.exclude"],
    ),
    (
        "submit_negative_requeues",
        ["submit", "--dry-run", "--max-timeout-requeues=-1", "train.output_dir={d}/run"],
        {},
        ["--max-timeout-requeues"],
    ),
    (
        "submit_zero_cpus",
        ["submit", "--dry-run", "--cpus-per-task", "0", "train.output_dir={d}/run"],
        {},
        ["--cpus-per-task"],
    ),
    ("submit_bad_launch", ["submit", "--dry-run", "--launch", "rocket"], {}, ["--launch"]),
    ("submit_text_nodes", ["submit", "--dry-run", "--nodes", "two"], {}, ["--nodes"]),
    (
        "submit_nproc_mismatch",
        ["submit", "--dry-run", "--gpus-per-node", "4", "dist.nproc=2", "train.output_dir={d}/run"],
        {},
        ["dist.nproc"],
    ),
    # --- sweep --dry-run ---
    (
        "sweep_key_twice",
        ["sweep", "--dry-run", "--grid", "nodes=1,2", "--grid", "slurm.nodes=3", "train.output_dir={d}/sw"],
        {},
        ["--grid", "slurm.nodes"],
    ),
    (
        "sweep_key_and_flag",
        ["sweep", "--dry-run", "--nodes", "2", "--grid", "nodes=1,2", "train.output_dir={d}/sw"],
        {},
        ["--grid", "--nodes"],
    ),
    (
        "sweep_zero_parallel",
        ["sweep", "--dry-run", "--max-parallel", "0", "--grid", "nodes=1,2"],
        {},
        ["--max-parallel"],
    ),
    ("sweep_no_values", ["sweep", "--dry-run", "--grid", "nodes"], {}, ["--grid"]),
    ("sweep_repeated_value", ["sweep", "--dry-run", "--grid", "nodes=1,1", "train.output_dir={d}/sw"], {}, ["--grid"]),
    (
        "sweep_bad_point",
        ["sweep", "--dry-run", "--grid", "train.lr=.inf,1e-4", "train.output_dir={d}/sw"],
        {},
        ["train.lr", "finite"],
    ),
    (
        "sweep_zero_nodes_point",
        ["sweep", "--dry-run", "--grid", "nodes=0,1", "train.output_dir={d}/sw"],
        {},
        ["slurm.nodes"],
    ),
    ("sweep_newline_out", ["sweep", "--dry-run", "--grid", "nodes=1,2", "--out", "{d}/s\nw"], {}, ["train.output_dir"]),
    # --- report ---
    ("report_missing_dir", ["report", "{d}/nope"], {}, ["nope", "not a directory"]),
    ("report_empty_dir", ["report", "{d}"], {}, ["no result.json"]),
    (
        "report_corrupt_json",
        ["report", "{d}"],
        {"p0/result.json": '{"model": "m",\n  oops}'},
        ["p0/result.json line 2"],
    ),
    ("report_not_utf8", ["report", "{d}"], {"p0/result.json": b'{"model": "\xff"}'}, ["p0/result.json", "UTF-8"]),
    ("report_list", ["report", "{d}"], {"p0/result.json": "[1, 2]"}, ["p0/result.json", "JSON object"]),
    ("report_missing_field", ["report", "{d}"], {"p0/result.json": _result(world=None)}, ["p0/result.json", "'world'"]),
    (
        "report_text_number",
        ["report", "{d}"],
        {"p0/result.json": _result(tokens_per_s="fast")},
        ["p0/result.json", "'tokens_per_s'"],
    ),
    # --- data (preprocess) ---
    (
        "data_bad_jsonl_line",
        ["preprocess", "data.path={d}/d.jsonl"],
        {"d.jsonl": ROW * 2 + "{oops\n" + ROW},
        ["data.path", "d.jsonl line 3"],
    ),
    (
        "data_line_separator_in_string",
        ["preprocess", "data.path={d}/d.jsonl"],
        {"d.jsonl": '{"prompt": "a\u2028b", "completion": "c"}\n' + ROW + "{oops\n"},
        ["d.jsonl line 3"],
    ),
    (
        "data_blank_lines_counted",
        ["preprocess", "data.path={d}/d.jsonl"],
        {"d.jsonl": ROW + "\n\n" + "[1,\n"},
        ["d.jsonl line 4"],
    ),
    (
        "data_not_utf8",
        ["preprocess", "data.path={d}/d.jsonl"],
        {"d.jsonl": ROW.encode() + b'{"prompt": "\xfe"}\n'},
        ["data.path", "d.jsonl line 2", "UTF-8"],
    ),
    ("data_json_scalar", ["preprocess", "data.path={d}/d.json"], {"d.json": "42"}, ["data.path", "JSON list"]),
    ("data_json_list_of_ints", ["preprocess", "data.path={d}/d.json"], {"d.json": "[1, 2]"}, ["data.path", "sample 0"]),
    ("data_jsonl_row_is_list", ["preprocess", "data.path={d}/d.jsonl"], {"d.jsonl": ROW + "[1]\n"}, ["sample 1"]),
    (
        "data_chat_not_list",
        ["preprocess", "data.path={d}/d.jsonl", "data.format=auto"],
        {"d.jsonl": '{"messages": "hi"}\n'},
        ["sample 0", "'messages' must be a list"],
    ),
    (
        "data_chat_no_role",
        ["preprocess", "data.path={d}/d.jsonl", "data.format=chat"],
        {"d.jsonl": '{"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'},
        ["'messages' must be a list", "one is {'content': 'hi'}"],
    ),
    (
        "data_chat_last_not_assistant",
        ["preprocess", "data.path={d}/d.jsonl", "data.format=chat"],
        {"d.jsonl": '{"messages": [{"role": "user", "content": "hi"}]}\n'},
        ["sample 0", "assistant"],
    ),
    (
        "data_completion_mapping",
        ["preprocess", "data.path={d}/d.jsonl"],
        {"d.jsonl": '{"prompt": "a", "completion": {"x": 1}}\n'},
        ["sample 0", "'completion'"],
    ),
    ("data_missing_file", ["preprocess", "data.path={d}/none.jsonl"], {}, ["data.path", "not found"]),
    (
        "data_missing_eval_file",
        ["preprocess", "data.path={d}/d.jsonl", "data.eval_path={d}/none.jsonl", "data.eval_fraction=0"],
        {"d.jsonl": ROW * 4},
        ["data.eval_path", "none.jsonl"],
    ),
    (
        "data_bad_eval_json",
        ["preprocess", "data.path={d}/d.jsonl", "data.eval_path={d}/e.jsonl", "data.eval_fraction=0"],
        {"d.jsonl": ROW * 4, "e.jsonl": "{\n"},
        ["data.eval_path", "e.jsonl line 1"],
    ),
    ("data_empty_file", ["preprocess", "data.path={d}/d.jsonl"], {"d.jsonl": "\n\n"}, ["data.path", "no samples"]),
    (
        "data_unknown_fields",
        ["preprocess", "data.path={d}/d.jsonl", "data.format=auto"],
        {"d.jsonl": '{"q": 1}\n'},
        ["data.format"],
    ),
    # --- models (train) ---
    (
        "model_truncated_config",
        ["train", "model.name={d}/m", "train.output_dir={d}/run"],
        {"m/config.json": '{"model_type": "llama", "hidden_'},
        ["model.name", "config.json line 1"],
    ),
    (
        "model_config_not_object",
        ["train", "model.name={d}/m", "train.output_dir={d}/run"],
        {"m/config.json": "[]"},
        ["model.name", "config.json", "JSON object"],
    ),
    (
        "model_config_no_type",
        ["train", "model.name={d}/m", "train.output_dir={d}/run"],
        {"m/config.json": '{"hidden_size": 8}'},
        ["model.name", "model_type"],
    ),
    (
        "model_config_not_utf8",
        ["train", "model.name={d}/m", "train.output_dir={d}/run"],
        {"m/config.json": b'{"model_type": "\xff"}'},
        ["model.name", "UTF-8"],
    ),
    ("train_multi_node", ["train", "dist.nnodes=2", "train.output_dir={d}/run"], {}, ["dist.nnodes"]),
    (
        "train_accuracy_on_plain_text",
        [
            "train",
            "data.path={d}/d.jsonl",
            "data.format=auto",
            "train.eval_accuracy_samples=4",
            "train.output_dir={d}/run",
        ],
        {"d.jsonl": '{"text": "12+34=46"}\n' * 40},
        ["train.eval_accuracy_samples", "plain text"],
    ),
    ("train_accuracy_negative", ["validate", "train.eval_accuracy_samples=-1"], {}, ["train.eval_accuracy_samples"]),
    ("train_accuracy_zero_tokens", ["validate", "train.eval_max_new_tokens=0"], {}, ["train.eval_max_new_tokens"]),
    # --- run directories (generate, merge) ---
    ("generate_missing_dir", ["generate", "{d}/nope", "--prompt", "1+1="], {}, ["RUN_DIR", "nope"]),
    (
        "generate_unfinished_run",
        ["generate", "{d}/run", "--prompt", "1+1="],
        _run_dir(weights=None),
        ["RUN_DIR", "adapter_model.safetensors"],
    ),
    (
        "generate_corrupt_adapter_config",
        ["generate", "{d}/run", "--prompt", "1+1="],
        _run_dir(adapter='{"r": 8,\n'),
        ["adapter_config.json line 2"],
    ),
    (
        "generate_recipe_not_utf8",
        ["generate", "{d}/run", "--prompt", "1+1="],
        _run_dir(recipe_text=b"\xff\xfe"),
        ["recipe.yaml", "UTF-8"],
    ),
    (
        "generate_bad_recipe",
        ["generate", "{d}/run", "--prompt", "1+1="],
        _run_dir(recipe_text=GOOD + "train: {lr: 0}\n"),
        ["recipe.yaml", "train.lr"],
    ),
    (
        "generate_zero_tokens",
        ["generate", "{d}/run", "--prompt", "x", "--max-new-tokens", "0"],
        {},
        ["--max-new-tokens"],
    ),
    ("generate_corrupt_weights", ["generate", "{d}/run", "--prompt", "1+1="], _run_dir(), ["RUN_DIR", "adapter"]),
    ("merge_missing_dir", ["merge", "{d}/nope", "{d}/out"], {}, ["RUN_DIR"]),
    ("merge_bad_dtype", ["merge", "{d}/run", "{d}/out", "--dtype", "int4"], {}, ["--dtype"]),
    ("merge_out_is_a_file", ["merge", "{d}/run", "{d}/out"], {**_run_dir(), "out": "x"}, ["OUT_DIR"]),
]


def _write(root, files: dict) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exit
        code = e.code
    return code, capsys.readouterr().err


def test_the_corpus_is_broad():
    commands = {argv[0] for _, argv, _, _ in CASES}
    assert len(CASES) >= 60 and len({name for name, *_ in CASES}) == len(CASES)
    assert commands >= {
        "train",
        "validate",
        "configs",
        "plan",
        "submit",
        "sweep",
        "report",
        "preprocess",
        "generate",
        "merge",
    }


@pytest.mark.parametrize("name,argv,files,words", CASES, ids=[c[0] for c in CASES])
def test_user_mistake_is_one_clear_error(name, argv, files, words, tmp_path, capsys):
    _write(tmp_path, files)
    code, err = run_main([a.replace("{d}", str(tmp_path)) for a in argv], capsys)
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.splitlines()  # the error, after any progress bar a model load printed before it
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("error: ")) :]
    assert len(lines) <= 12 and all(len(line) <= 400 for line in lines), err[:2000]
    for word in words:
        assert word.replace("{d}", str(tmp_path)) in err, err
    assert not (tmp_path / "pwned").exists()
