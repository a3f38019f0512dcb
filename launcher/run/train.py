"""A run from recipe to saved adapter: set up, data, model, resume, the loop (`loop.fit`), finish.

Run directly by `launcher train`, or per process by
`accelerate launch -m launcher.train RECIPE [key=value ...]`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from launcher.config.errors import UserError
from launcher.config.recipe import Recipe, load_recipe, save_recipe, split_args
from launcher.config.tables import OPTIMIZERS
from launcher.config.userio import first_line
from launcher.run import (
    answers,
    checkpoint,
    chunked_loss,
    console,
    data,
    fused,
    launch_configs,
    loop,
    metrics,
    placement,
    preempt,
    preflight,
    sharding,
    watch,
)
from launcher.run import resume as resume_contract
from launcher.run.context import RunContext
from launcher.run.loop import Fitted, fit
from launcher.run.model import (
    adapter_for,
    count_parameters,
    load_base_model,
    load_tokenizer,
    resolve_source,
    streaming_malloc,
)
from launcher.run.optim import build_optimizer, build_scheduler

if TYPE_CHECKING:  # annotations only
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _fill_deepspeed_batch(accelerator: Accelerator, cfg, world: int) -> None:
    """The recipe is the truth for batch values; set them in the DeepSpeed config before prepare.

    train_batch_size uses the torch.distributed world: accelerate reports one process under
    DeepSpeed on CPU, and DeepSpeed asserts micro x accum x world == train_batch_size."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    want = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm or 0.0,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world,
    }
    for key, value in want.items():
        if ds.get(key, "auto") not in ("auto", value) and accelerator.is_main_process:
            print(f"note: DeepSpeed config {key}={ds[key]} replaced by the recipe's {value}", file=sys.stderr)
        ds[key] = value


def _save_adapter(model: torch.nn.Module, adapter: dict, run_dir: Path) -> None:
    """peft's save_pretrained with the gathered tensors. Under FSDP1 peft matches none of them
    (its module names carry FSDP's wrapper prefixes) and writes an empty file, so then apply
    peft's own key rule (drop the adapter name) and write the tensors ourselves."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(run_dir, state_dict=adapter)
    path = run_dir / "adapter_model.safetensors"
    if adapter and not load_file(path):
        save_file(
            {k.replace(".default", ""): v.contiguous() for k, v in adapter.items()}, path, metadata={"format": "pt"}
        )


def _gather(value, world: int) -> list:
    """One value from every rank, in rank order (all_gather_object; a no-op for one process)."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, value)
    return out


def _prepare_fsdp(model: torch.nn.Module, accelerator: Accelerator, offload: bool):
    """FSDP2: our own fully_shard wrapping (accelerate keeps an already wrapped model);
    FSDP1: accelerate wraps with peft's policy, so each unit has uniform requires_grad."""
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version == 2:
        model = sharding.fsdp2_shard(model, offload=offload)
        plugin.auto_wrap_policy = None  # already wrapped; accelerate would look for the original class names
        return model
    from peft.utils.other import fsdp_auto_wrap_policy

    plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    return accelerator.prepare(model)  # FSDP1 flattens now; the optimizer is built on the flat parameters


def train(recipe: Recipe, resume: bool = False) -> tuple[dict, torch.nn.Module]:
    """Run the recipe; returns (summary, the trained peft model unwrapped from accelerate). A write that
    fails during the run (a full disk, a quota) ends it with one line, not a traceback."""
    try:
        return _train(recipe, resume)
    except Exception as e:
        if isinstance(e, UserError) or not preflight.is_io_error(e):
            raise
        run_dir = Path(recipe.train.output_dir)
        raise preflight.io_failure(run_dir, "the run's files", e, checkpoint.newest(run_dir)) from None


def _train(recipe: Recipe, resume: bool) -> tuple[dict, torch.nn.Module]:
    """The phases, each a function below: set up (accelerator, placement), data, model (load, shard,
    prepare, optimizer), resume, the loop, finish (adapter and summary)."""
    from accelerate.utils import set_seed

    console.quiet_libraries()
    run_dir = Path(recipe.train.output_dir)
    checkpoint.check_run_dir(run_dir, resume)
    if resume:
        resume_contract.check(run_dir, recipe, console.say)
    preflight.writable(run_dir, recipe.data.cache_dir)
    accelerator = make_accelerator(recipe.train, run_dir, recipe.dist.timeout_s)
    stop = preempt.StopRequest(run_dir)  # USR2 (time limit) / TERM (preemption): checkpoint at the next step, exit
    set_seed(recipe.train.seed)
    with accelerator.main_process_first():  # rank 0 builds the tiny model once; others read it
        source = resolve_source(recipe.model)
    pl = placement.resolve(recipe, accelerator, placement.model_config(source))
    ctx = RunContext(recipe, accelerator, pl, run_dir, checkpoint.Progress(), stop)
    ctx.watch = watch.Watch(run_dir, pl.rank, pl.world, recipe.dist.timeout_s)
    _fill_deepspeed_batch(accelerator, recipe.train, pl.world)
    tokenizer = load_tokenizer(source, recipe.model)
    d = setup_data(recipe, tokenizer, pl.world)
    model, loaded = setup_model(recipe, source, pl, accelerator, d.total_steps)
    preflight.room(run_dir, preflight.checkpoint_bytes(loaded["trainable"], OPTIMIZERS[pl.optimizer].state_bytes))
    console.say(console.data_line(recipe.data.path, d.stats))
    console.say(f"data: {json.dumps(d.stats)}", console.VERBOSE)
    setup_optimizer(ctx, model, d.total_steps)
    train_dl, eval_dl, base_dl = make_loaders(recipe, d, tokenizer, pl)
    restore(ctx, resume)
    start_run_dir(accelerator, recipe, run_dir, tokenizer)
    evals = loop.Evals(eval_dl, d.eval_prompts, tokenizer) if d.eval_ex else None
    run = fit(ctx, train_dl, evals, d.total_steps)
    if run.interrupted:  # the checkpoint holds everything; the adapter is written when the run ends
        step = ctx.progress.step
        if accelerator.is_main_process:
            preempt.mark(run_dir, step, stop.signum)
        accelerator.print(f"stopped at step {step} on a stop signal; checkpoint saved, resume continues from it")
        end_training(accelerator)
        return {"steps": step, "interrupted": True, "restarts": ctx.progress.restarts}, sharding.unwrap(ctx.model)
    return finish(ctx, run, loaded, base_dl, evals)


def make_accelerator(cfg, run_dir: Path, timeout_s: int):
    from accelerate import Accelerator, InitProcessGroupKwargs

    deepspeed = placement.launched_with_deepspeed()
    # Without a backend accelerate counts one process on every CPU DeepSpeed rank.
    backend = "gloo" if deepspeed and not torch.cuda.is_available() else None
    handlers = [InitProcessGroupKwargs(backend=backend, timeout=watch.start_timeout(timeout_s))]
    watch.init_restarted_group(timeout_s, backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=None
        if deepspeed
        else launch_configs.mixed_precision(  # under DeepSpeed its JSON says it
            cfg.mixed_precision, torch.cuda.is_available(), torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        ),
        log_with=cfg.report_to or None,
        project_dir=str(run_dir),
        kwargs_handlers=handlers,
    )


@dataclass
class Data:
    train_ex: object  # a view of the tokenized cache (launcher.run.data); None when streaming
    eval_ex: object
    stats: dict
    total_steps: int
    eval_prompts: list  # eval samples answered for eval_accuracy (empty: off)


def setup_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, world: int) -> Data:
    """Tokenized (cached) samples and the run length; a stream is read as consumed, for train.max_steps."""
    cfg = recipe.train
    if recipe.data.streaming:
        evals, prompts = [], []
        if recipe.data.eval_path:
            rows = data.read_samples(
                recipe.data.eval_path, recipe.data.eval_split or recipe.data.split, "data.eval_path"
            )
            tok = data.tokenize(rows, recipe.data, tokenizer)
            evals = tok.examples
            prompts = answers.prompts_of(tok.examples, cfg.eval_accuracy_samples, tok.stats["format"])
        return Data(None, evals, {"streaming": True}, cfg.max_steps, prompts)
    p = data.prepare(recipe.data, tokenizer, cfg.seed, cfg.micro_batch_size)
    batches = data.batches_per_epoch(len(p.train), world, cfg.micro_batch_size, recipe.data.remainder)
    if batches == 0:
        raise UserError(f"data: {len(p.train)} training samples cannot feed {world} processes")
    steps_per_epoch = math.ceil(batches / cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    prompts = answers.prompts_of(p.eval_samples, cfg.eval_accuracy_samples, p.stats["format"])
    return Data(p.train, p.eval, p.stats, total, prompts)


def memory_lines(recipe: Recipe, pl: placement.Placement, gpu: bool) -> list[str]:
    """One line for each memory setting the planner decided (a budget's kept layers; an auto choice and why)."""
    t, lines = recipe.train, []
    if pl.memory_budget_gb:
        kept = f"the last {pl.kept_layers} decoder layer(s) keep" if pl.kept_layers else "no decoder layer keeps"
        how = ""
        if t.memory_budget_gb == "auto":
            how = " (auto: 85% of this GPU's memory)" if gpu else " (auto on CPU: what recomputing every layer needs)"
        lines.append(
            f"checkpointing: {kept} their activations, the others recompute (what the planner fits in "
            f"train.memory_budget_gb={pl.memory_budget_gb:.1f}{how})"
        )
    if t.chunked_loss == "auto" and pl.chunked_loss:
        lines.append(
            f"train.chunked_loss: auto: {pl.chunked_loss} tokens a chunk (the planner finds the logits, "
            f"{t.micro_batch_size * recipe.data.max_seq_len} tokens x the vocabulary, the step's largest transient)"
        )
    return lines


def setup_model(recipe: Recipe, source: str, pl: placement.Placement, accelerator: Accelerator, total_steps: int):
    """The 4-bit base with its adapter, loaded the way the placement says: every rank reads it, or
    only rank 0 reads and the others receive their shards (FSDP2) or partitions (ZeRO-3).
    Returns (model, what the load cost)."""
    load_start, rss_before = time.perf_counter(), metrics.host_rss_gb()
    quant = "unquantized" if recipe.quant.mode == "none" else f"quantized to {recipe.quant.mode}"
    console.say(
        f"loading {recipe.model.name} ({quant}) with a {recipe.peft.method} adapter, "
        f"strategy {pl.strategy} on {pl.world} process(es)"
    )
    for line in memory_lines(recipe, pl, accelerator.device.type == "cuda"):
        console.say(line)

    def load(device_map):
        return load_base_model(
            source, recipe.model, recipe.quant, dtype=pl.param_dtype, device_map=device_map, storage=pl.storage_dtype
        )

    def wrap(base: torch.nn.Module):
        return adapter_for(
            recipe, base, kbit_upcast=pl.kbit_upcast, total_steps=total_steps, kept_layers=pl.kept_layers
        )

    if pl.fsdp2_rank0_reads:
        model = sharding.load_fsdp2(load, wrap, offload=pl.offload, device=accelerator.device)
        accelerator.state.fsdp_plugin.auto_wrap_policy = None  # already wrapped
    elif pl.zero3_rank0_reads:  # DeepSpeed partitions them from rank 0 in prepare()
        with sharding.without_hf_zero3(accelerator.state.deepspeed_plugin), streaming_malloc():
            model = sharding.load_zero3(load, wrap, device=accelerator.device)
    else:
        model = wrap(load(pl.device_map))
    if pl.chunked_loss:
        why = chunked_loss.unsupported(model.config)
        if why and recipe.train.chunked_loss == "auto":
            console.say(f"train.chunked_loss: auto: off, {why}")
        elif why:
            raise UserError(f"train.chunked_loss: not for {recipe.model.name}: {why}; set it to 0")
        else:
            chunked_loss.install(model, pl.chunked_loss)
    # Compiled for the run only: the trace runs the eager step (AOTAutograd picks what a compiled layer keeps).
    if recipe.train.compile and not fused.compile_layers(model):
        raise UserError(f"train.compile: found no decoder layers to compile in {recipe.model.name}; set it to false")
    trainable, total = count_parameters(model)
    console.say(
        f"model: {total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.2f}%), "
        f"loaded in {time.perf_counter() - load_start:.1f} s"
    )
    return model, {
        "trainable": trainable,
        "total": total,
        "load_s": time.perf_counter() - load_start,
        "load_rss_gb": metrics.host_rss_gb(peak=True) - rss_before,
    }  # host memory the load added at peak


def setup_optimizer(ctx: RunContext, model: torch.nn.Module, total_steps: int) -> None:
    """Shard (FSDP) before the optimizer sees the parameters, then let accelerate prepare both; the
    prepared model, optimizer and schedule go into the context."""
    pl, accelerator = ctx.placement, ctx.accelerator
    if pl.shards_before_optimizer:
        model = _prepare_fsdp(model, accelerator, pl.offload)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, ctx.recipe.train, pl.optimizer, console.say)
    ctx.scheduler = build_scheduler(optimizer, ctx.recipe.train, total_steps)
    if pl.fsdp1:
        optimizer = accelerator.prepare(optimizer)
    else:
        with streaming_malloc() if pl.zero3_rank0_reads else contextlib.nullcontext():
            model, optimizer = accelerator.prepare(model, optimizer)
    ctx.model, ctx.optimizer = model, optimizer


def make_loaders(recipe: Recipe, d: Data, tokenizer: PreTrainedTokenizerBase, pl: placement.Placement):
    """(train, eval, the train loader before accelerate). Our sampler already gives each rank its
    share; accelerate only tracks the epoch end (so accumulate() syncs on the last short window)."""
    from accelerate.data_loader import prepare_data_loader

    cfg = recipe.train
    if recipe.data.streaming:
        base = data.make_stream_loader(recipe.data, tokenizer, cfg.micro_batch_size, pl.rank, pl.world)
    else:
        base = data.make_loader(
            d.train_ex,
            cfg.micro_batch_size,
            pl.rank,
            pl.world,
            cfg.seed,
            tokenizer.pad_token_id,
            remainder=recipe.data.remainder,
            group_by_length=recipe.data.group_by_length,
        )
    eval_dl = data.make_loader(
        d.eval_ex,
        cfg.micro_batch_size,
        pl.rank,
        pl.world,
        cfg.seed,
        tokenizer.pad_token_id,
        shuffle=False,
        remainder="pad",
    )  # every eval sample counts once
    return prepare_data_loader(base, num_processes=1, process_index=0), eval_dl, base


def restore(ctx: RunContext, resume: bool) -> None:
    """Keep checkpoints to the adapter; with --resume, load the newest intact checkpoint and the
    progress and schedule it recorded (JSON)."""
    accelerator, progress = ctx.accelerator, ctx.progress
    accelerator.register_save_state_pre_hook(checkpoint.trainable_only_hook)
    if not resume:
        return
    last = checkpoint.newest_intact(ctx.run_dir, console.say)
    if last is not None:
        meta = checkpoint.load(accelerator, last, deepspeed=ctx.placement.deepspeed)
        progress.load_state_dict(meta["progress"])
        ctx.scheduler.load_state_dict(meta["scheduler"])
        progress.restarts += 1
        accelerator.print(f"resumed from {last} at step {progress.step} (restart {progress.restarts})")
    # What was logged past the checkpoint (everything, without one) is done again: each step is logged once.
    step, rank = progress.step, ctx.placement.rank
    if accelerator.is_main_process:
        metrics.keep_rows(ctx.run_dir / "metrics.jsonl", lambda row: last is not None and row.get("step", 0) <= step)
    ids = ctx.run_dir / "sample_ids" / f"rank{rank}.jsonl"
    metrics.keep_rows(ids, lambda row: "ids" in row and row["step"] < step)


def start_run_dir(accelerator: Accelerator, recipe: Recipe, run_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if os.environ.get(preempt.UNDER_JOB):
            (run_dir / preempt.MARKER).unlink(missing_ok=True)  # a stop request from the Slurm task stays
        else:
            preempt.clear(run_dir)
        save_recipe(recipe, run_dir / "recipe.yaml")
        tokenizer.save_pretrained(run_dir)
    accelerator.init_trackers("tensorboard", config=_flat(recipe.model_dump(mode="json")))


def finish(
    ctx: RunContext, run: Fitted, loaded: dict, base_dl, evals: loop.Evals | None = None
) -> tuple[dict, torch.nn.Module]:
    """Gather and save the adapter, then the summary (one gather of every rank's figures)."""
    recipe, model, pl, accelerator, progress = ctx.recipe, ctx.model, ctx.placement, ctx.accelerator, ctx.progress
    run_dir = ctx.run_dir
    accelerator.wait_for_everyone()
    unwrapped = sharding.unwrap(model)
    adapter = sharding.trainable_state(model, accelerator, fsdp1=pl.fsdp1, zero3=pl.zero3)
    run.ids_log.close({"done": progress.step, "adapter_sha256": sharding.digest(adapter)})
    if accelerator.is_main_process:
        _save_adapter(unwrapped, adapter, run_dir)
    accelerator.wait_for_everyone()
    device = accelerator.device
    mine = {
        "peak_mem_gb": round(metrics.peak_memory_gb(device), 3),
        "load_host_gb": round(loaded["load_rss_gb"], 3),
        "tokens": run.tokens,
    }
    if device.type == "cuda":  # what the allocator held (allocated + cache): what nvidia-smi sees, less the context
        mine["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    ranks = _gather(mine, pl.world)
    loop_s = max(run.loop_s, 1e-9)
    summary = {
        "steps": progress.step,
        "eval_loss": run.eval_loss,
        "eval_accuracy": run.eval_accuracy,
        "trainable_params": loaded["trainable"],
        "total_params": loaded["total"],
        "processes": pl.world,
        "strategy": pl.strategy,
        "optimizer": pl.optimizer,
        "restarts": progress.restarts,
        "peak_mem_gb_per_rank": [r["peak_mem_gb"] for r in ranks],
        "load_host_gb_per_rank": [r["load_host_gb"] for r in ranks],
        "load_s": round(loaded["load_s"], 2),
        "first_step_s": run.first_step_s and round(run.first_step_s, 2),
        "train_loop_s": round(run.loop_s, 2),
        "tokens_per_s_rank0": round(run.tokens / loop_s, 1),
        "tokens_per_s": round(sum(r["tokens"] for r in ranks) / loop_s, 1),
        "step_s": round(run.loop_s / max(progress.step - run.start_step, 1), 4),
        "final_loss": run.last_loss,
    }
    if device.type == "cuda":
        summary["peak_reserved_gb_per_rank"] = [r["peak_reserved_gb"] for r in ranks]
    if recipe.data.streaming:  # drops are only known as the stream is read: report them at the end
        c = base_dl.dataset.counts
        summary["stream_rank0"] = {
            "dropped_empty": c.dropped_empty,
            "dropped_too_long": c.dropped_long,
            "truncated": c.truncated,
        }
        accelerator.print(
            f"stream (rank 0): {json.dumps(summary['stream_rank0'])} (dropped samples trained as loss-free fillers)"
        )
    if accelerator.is_main_process:
        first = next((r for r in metrics.read(run_dir / "metrics.jsonl") if "eval_loss" in r), {})
        summary["first_eval_loss"] = first.get("eval_loss")
        summary["first_eval_accuracy"] = first.get("eval_accuracy")
        if evals is not None and evals.example is not None:
            summary["eval_example"] = dict(zip(("prompt", "answer", "expected"), evals.example))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        metrics.plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
        console.say(
            "\n".join(console.final_report(summary, run_dir, len(evals.prompts) if evals else 0)), console.QUIET
        )
    end_training(accelerator)
    return summary, unwrapped


def end_training(accelerator: Accelerator) -> None:
    """accelerate's end_training, less its destroy_process_group. That one left DDP's reducer the last
    holder of the gloo group, so the group's destructor ran when `_train` returned: on the main thread,
    holding the GIL, joining gloo's workers, one of which was still freeing the last all_gather and
    waiting for the GIL. Rank 0 hung there after writing summary.json (py-spy: ~ProcessGroupGloo in
    std::thread::join): once in CI, once in 9 2-rank runs here before the fix, both under
    bench/live_peak's dispatch mode. The group now lives until the rank's os._exit (`leave`), so that
    destructor never runs."""
    for tracker in accelerator.trackers:
        tracker.finish()


# What gloo and NCCL say when the other end of a collective has died (seen: gloo's "Connection
# closed by peer ... typically caused by a remote worker crashing").
PEER_GONE = re.compile(
    r"closed by peer|reset by peer|remote worker|Broken pipe|communicator was aborted|"
    r"NCCL error.*remote process exited",
    re.IGNORECASE,
)


def main(argv: list[str] | None = None) -> int:
    """Per-process entry for `accelerate launch -m launcher.train [RECIPE] [key=value ...] [--resume]`."""
    if (
        not torch.cuda.is_available()
        and int(os.environ.get("WORLD_SIZE", 1)) > 1
        and not placement.launched_with_deepspeed()
    ):
        # accelerate's multi-GPU launcher does not pass use_cpu on; without it DDP ranks see no
        # distribution. (Not for DeepSpeed: use_cpu would silently turn it into plain DDP.)
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    argv = list(sys.argv[1:] if argv is None else argv)
    # A rank torchrun restarted (dist.max_restarts) continues from the checkpoint, as --resume would.
    resume = "--resume" in argv or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
    path, overrides = split_args([a for a in argv if a != "--resume"])
    recipe = None
    try:
        recipe = load_recipe(path, overrides)
        train(recipe, resume=resume)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except RuntimeError as e:  # a collective whose peer is gone: the launcher reports the dead rank itself
        if int(os.environ.get("WORLD_SIZE", 1)) == 1:
            raise
        if recipe is not None and watch.timed_out(e):
            run_dir = Path(recipe.train.output_dir)
            rank = int(os.environ.get("RANK", 0))
            line = watch.report(run_dir, rank, recipe.dist.timeout_s, checkpoint.newest(run_dir))
            print(f"error: {line}", file=sys.stderr)
            return watch.HUNG_EXIT
        if not PEER_GONE.search(str(e)):
            raise
        print(
            f"rank {os.environ.get('RANK', '?')}: stopping, another rank is gone ({first_line(e)[:160]})",
            file=sys.stderr,
        )
        return 1
    finally:
        import torch.distributed as dist

        # One process (leave() is not called): a clean exit, gloo threads left running can abort it.
        # Several: the group ends with os._exit (see end_training).
        if int(os.environ.get("WORLD_SIZE", 1)) == 1 and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def leave(code: int) -> None:
    """End a rank of a multi-process run without C++ static destructors: a finished ZeRO-2/ZeRO-3 rank
    on gloo sometimes aborted at interpreter exit ("terminate called without an active exception",
    SIGABRT, seen in CI about once in ten runs) after its work and the process group were done,
    which turned a complete run into a failed launch. Everything is written and closed by now."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
