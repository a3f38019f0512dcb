"""Generated accelerate / DeepSpeed configs for a recipe on a machine, with the QLoRA settings explained.

`launcher configs RECIPE --out DIR` writes DIR/accelerate_configs/NAME.yaml and, for ZeRO,
DIR/ds_configs/NAME.json. `launcher train` with several processes writes the same files into
the run directory and launches `accelerate launch --config_file` on them, so what a user runs
by hand and what the launcher runs are one thing.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from launcher.config.recipe import Recipe
from launcher.config.tables import FSDP, OFFLOAD, ZERO_STAGE

Item = tuple  # (key, value or list[Item], comment)


def mixed_precision(choice: str, gpu: bool, bf16_ok: bool = True) -> str:
    """train.mixed_precision resolved: `auto` is bf16 on GPUs that support it, else no autocast. The
    one resolver for the generated configs (written for a GPU node, assumed bf16-capable) and the
    run itself (which asks its own GPU)."""
    return ("bf16" if gpu and bf16_ok else "no") if choice == "auto" else choice


def deepspeed_config(recipe: Recipe, strategy: str, gpu: bool) -> dict:
    """DeepSpeed JSON for zero2 / zero3 / zero3_offload. Batch values come from the recipe;
    the training loop re-applies them at run time, so an override on the command line wins."""
    t = recipe.train
    mp = mixed_precision(t.mixed_precision, gpu)
    zero: dict = {
        "stage": ZERO_STAGE[strategy],
        "overlap_comm": gpu,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if ZERO_STAGE[strategy] == 3:
        # Without this the saved adapter is empty: the LoRA weights stay partitioned.
        zero.update(
            {
                "stage3_gather_16bit_weights_on_model_save": True,
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
            }
        )
    if strategy in OFFLOAD:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
        zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    cfg = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "bf16": {"enabled": mp == "bf16"},
        "fp16": {"enabled": mp == "fp16"},
        "zero_optimization": zero,
        # bitsandbytes and torch optimizers are "client" optimizers to DeepSpeed.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }
    if strategy in OFFLOAD:
        cfg["zero_force_ds_cpu_optimizer"] = False  # keep our optimizer instead of DeepSpeedCPUAdam
    return cfg


def accelerate_config(recipe: Recipe, strategy: str, gpu: bool, ds_file: str | None) -> list[Item]:
    """The accelerate YAML as (key, value, comment) items. Long on purpose: one declarative list, each
    key of the generated file next to the reason the launcher sets it, in the order a reader meets them."""
    d = recipe.dist
    procs = d.nproc * d.nnodes
    items: list[Item] = [
        ("compute_environment", "LOCAL_MACHINE", None),
        ("debug", False, None),
    ]
    if strategy in ZERO_STAGE:
        ds = [
            ("deepspeed_config_file", ds_file, "ZeRO settings live in the JSON (relative to the launch directory)"),
            ("deepspeed_multinode_launcher", "standard", "torchrun-style: one launch per node, no pdsh/ssh"),
        ]
        if ZERO_STAGE[strategy] == 3:
            ds.append(
                (
                    "zero3_init_flag",
                    False,
                    "zero.Init cannot split 4-bit layers as they load; the launcher "
                    "loads on rank 0 only and DeepSpeed partitions from there",
                )
            )
        items += [("distributed_type", "DEEPSPEED", None), ("deepspeed_config", ds, None)]
    elif strategy in FSDP:
        fs = _fsdp_items(d.fsdp_version, strategy in OFFLOAD)
        items += [
            (
                "distributed_type",
                "FSDP",
                "4-bit weights are stored in the parameter dtype (quant.storage_dtype auto) so FSDP can shard them",
            ),
            ("fsdp_config", fs, None),
        ]
    elif procs > 1:
        items.append(
            (
                "distributed_type",
                "MULTI_GPU",
                "DDP; on a CPU machine launcher.train sets ACCELERATE_USE_CPU so ranks use gloo"
                if not gpu
                else "DDP: one full 4-bit replica per GPU",
            )
        )
    else:
        items.append(("distributed_type", "NO", None))
    if strategy not in ZERO_STAGE:  # with a DeepSpeed JSON, its bf16/fp16 blocks say it (accelerate insists)
        items.append(
            (
                "mixed_precision",
                mixed_precision(recipe.train.mixed_precision, gpu),
                "autocast; 4-bit layers compute in quant.compute_dtype",
            )
        )
    items += [
        ("num_machines", d.nnodes, None),
        ("num_processes", procs, f"{d.nproc} per node x {d.nnodes} node(s)"),
        ("machine_rank", 0, "set per node at launch (Slurm: each node its own rank)" if d.nnodes > 1 else None),
        ("main_training_function", "main", None),
        ("rdzv_backend", "static", None),
        ("same_network", True, None),
        ("gpu_ids", "all", None),
        (
            "use_cpu",
            not gpu and strategy not in ZERO_STAGE,
            "DeepSpeed finds the CPU itself" if not gpu and strategy in ZERO_STAGE else None,
        ),
        ("downcast_bf16", "no", None),
        ("tpu_env", [], None),
        ("tpu_use_cluster", False, None),
        ("tpu_use_sudo", False, None),
    ]
    return items


def _fsdp_items(version: int, offload: bool) -> list[Item]:
    """The fsdp_config block: FSDP2 (fully_shard) or FSDP1 with the peft-aware wrap policy."""
    fs: list[Item] = [
        ("fsdp_version", version, "2: fully_shard, per-parameter DTensor sharding"),
        (
            "fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP",
            "one unit per decoder layer (model._no_split_modules); the LoRA weights live inside",
        ),
        ("fsdp_cpu_ram_efficient_loading", True, "rank 0 reads the checkpoint, the others start empty"),
        ("fsdp_offload_params", offload, "parameters and optimizer state on CPU"),
        ("fsdp_state_dict_type", "SHARDED_STATE_DICT", "checkpoints are written shard by shard"),
        (
            "fsdp_activation_checkpointing",
            False,
            "the recipe's train.gradient_checkpointing does it (non-reentrant)",
        ),
    ]
    if version == 2:
        fs.append(("fsdp_reshard_after_forward", True, None))
    else:
        fs += [
            ("fsdp_sharding_strategy", "FULL_SHARD", None),
            (
                "fsdp_use_orig_params",
                False,
                "with the peft-aware wrap policy: every unit has uniform requires_grad",
            ),
            ("fsdp_sync_module_states", True, "broadcast rank 0's weights (needed with RAM-efficient loading)"),
            ("fsdp_backward_prefetch", "BACKWARD_PRE", None),
        ]
    return fs


def _render(items: list[Item], indent: int = 0) -> list[str]:
    lines = []
    pad = " " * indent
    for key, value, comment in items:
        note = f"  # {comment}" if comment else ""
        if isinstance(value, list) and value and isinstance(value[0], tuple):
            lines.append(f"{pad}{key}:{note}")
            lines += _render(value, indent + 2)
        else:
            text = yaml.safe_dump(value, default_flow_style=True).strip()
            text = text[:-4].rstrip() if text.endswith("\n...") else text.removesuffix("...").strip()
            lines.append(f"{pad}{key}: {text}{note}")
    return lines


def write(recipe: Recipe, strategy: str, out: Path, name: str, gpu: bool, source_note: str) -> list[Path]:
    """Write the accelerate YAML (and DeepSpeed JSON for ZeRO); returns the paths written."""
    written = []
    ds_file = None
    if strategy in ZERO_STAGE:
        ds_path = out / "ds_configs" / f"{name}.json"
        ds_path.parent.mkdir(parents=True, exist_ok=True)
        ds_path.write_text(json.dumps(deepspeed_config(recipe, strategy, gpu), indent=2) + "\n")
        written.append(ds_path)
        ds_file = str(ds_path)
    header = [
        f"# Generated by `launcher configs` from {source_note}; strategy {strategy}, {'GPU' if gpu else 'CPU (gloo)'}.",
        "# Launch: accelerate launch --config_file THIS_FILE -m launcher.train RECIPE [key=value ...]",
    ]
    acc_path = out / "accelerate_configs" / f"{name}.yaml"
    acc_path.parent.mkdir(parents=True, exist_ok=True)
    acc_path.write_text("\n".join(header + _render(accelerate_config(recipe, strategy, gpu, ds_file))) + "\n")
    written.insert(0, acc_path)
    return written
