"""The training loop: one accelerate-native function from recipe to saved adapter.

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
from pathlib import Path

import torch

from launcher import checkpoint, data, metrics, placement, preempt, sharding
from launcher.errors import UserError
from launcher.model import (DTYPES, apply_peft, compute_dtype, count_parameters, load_base_model, load_tokenizer,
                            resolve_source, streaming_malloc)
from launcher.optim import build_optimizer, build_scheduler
from launcher.recipe import Recipe, load_recipe, save_recipe
from launcher.userio import first_line


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _fill_deepspeed_batch(accelerator, cfg, world: int) -> None:
    """The recipe is the truth for batch values; set them in the DeepSpeed config before prepare.

    train_batch_size uses the torch.distributed world: accelerate reports one process under
    DeepSpeed on CPU, and DeepSpeed asserts micro x accum x world == train_batch_size."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    want = {"train_micro_batch_size_per_gpu": cfg.micro_batch_size, "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.max_grad_norm or 0.0,
            "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world}
    for key, value in want.items():
        if ds.get(key, "auto") not in ("auto", value) and accelerator.is_main_process:
            print(f"note: DeepSpeed config {key}={ds[key]} replaced by the recipe's {value}", file=sys.stderr)
        ds[key] = value


def _save_adapter(model, adapter: dict, run_dir: Path) -> None:
    """peft's save_pretrained with the gathered tensors. Under FSDP1 peft matches none of them
    (its module names carry FSDP's wrapper prefixes) and writes an empty file, so then apply
    peft's own key rule (drop the adapter name) and write the tensors ourselves."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(run_dir, state_dict=adapter)
    path = run_dir / "adapter_model.safetensors"
    if adapter and not load_file(path):
        save_file({k.replace(".default", ""): v.contiguous() for k, v in adapter.items()}, path,
                  metadata={"format": "pt"})


def _gather(value: float, world: int) -> list[float]:
    """One number from every rank, in rank order (all_gather_object; a no-op for one process)."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, value)
    return out


def _prepare_fsdp(model, accelerator):
    """FSDP2: our own fully_shard wrapping (accelerate keeps an already wrapped model);
    FSDP1: accelerate wraps with peft's policy, so each unit has uniform requires_grad."""
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version == 2:
        model = sharding.fsdp2_shard(model, offload=placement.fsdp_offloads(plugin))
        plugin.auto_wrap_policy = None  # already wrapped; accelerate would look for the original class names
        return model
    from peft.utils.other import fsdp_auto_wrap_policy

    plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    return accelerator.prepare(model)  # FSDP1 flattens now; the optimizer is built on the flat parameters


def forward_loss(model, batch: dict, device) -> tuple[torch.Tensor, int]:
    """(mean loss over the batch's label tokens, their count). The count is computed on the host
    and passed in, so a batch of loss-free fillers gives 0 with zero gradients instead of 0/0.
    use_cache=False keeps packed rows block-diagonal: transformers only reads packing from
    position ids when there is no cache."""
    n = int((batch["labels"][:, 1:] != data.IGNORE).sum())
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return model(**batch, use_cache=False, num_items_in_batch=max(n, 1)).loss, n


@torch.no_grad()
def evaluate(model, loader, accelerator, max_batches: int | None) -> float:
    """Token-weighted mean loss over this rank's eval shard, reduced over ranks."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch.pop("sample_ids"), batch.pop("real_tokens")
        loss, n = forward_loss(model, batch, accelerator.device)
        total += torch.stack([loss.float() * n, torch.tensor(float(n), device=accelerator.device)])
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1].clamp(min=1)).item()


def train(recipe: Recipe, resume: bool = False) -> tuple[dict, torch.nn.Module]:
    """Run the recipe; returns (summary, the trained peft model unwrapped from accelerate)."""
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    cfg = recipe.train
    run_dir = Path(cfg.output_dir)
    checkpoint.check_run_dir(run_dir, resume)
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    handlers = []
    if deepspeed and not torch.cuda.is_available():
        # Without a backend accelerate counts one process on every CPU DeepSpeed rank.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=None if deepspeed else _mixed_precision(cfg.mixed_precision),  # the DeepSpeed JSON says it
        log_with=cfg.report_to or None,
        project_dir=str(run_dir),
        kwargs_handlers=handlers,
    )
    rank, world = placement.rank_and_world()
    say = accelerator.print
    stop = preempt.StopRequest(run_dir)  # USR2 (time limit) / TERM (preemption): checkpoint at the next step, exit
    set_seed(cfg.seed)

    with accelerator.main_process_first():  # rank 0 builds the tiny model once; others read it
        source = resolve_source(recipe.model)
    strategy = placement.check(recipe, placement.Machine.detect(), placement.model_config(source))
    placement.check_launch(strategy, accelerator, world)
    _fill_deepspeed_batch(accelerator, cfg, world)
    tokenizer = load_tokenizer(source, recipe.model)
    if recipe.data.streaming:  # read as consumed; the run length is train.max_steps
        train_ex, stats = None, {"streaming": True}
        eval_ex = data.tokenize(data.read_samples(recipe.data.eval_path, recipe.data.eval_split or recipe.data.split,
                                                  "data.eval_path"),
                                recipe.data, tokenizer).examples \
            if recipe.data.eval_path else []
        total_steps = cfg.max_steps
    else:
        train_ex, eval_ex, stats = data.load_data(recipe.data, tokenizer, cfg.seed, cfg.micro_batch_size)
        batches = data.batches_per_epoch(len(train_ex), world, cfg.micro_batch_size, recipe.data.remainder)
        if batches == 0:
            raise UserError(f"data: {len(train_ex)} training samples cannot feed {world} processes")
        steps_per_epoch = math.ceil(batches / cfg.grad_accum)
        total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    load_start, rss_before = time.perf_counter(), metrics.host_rss_gb()
    param_dtype = compute_dtype(recipe.quant) if recipe.model.dtype == "auto" else DTYPES[recipe.model.dtype]

    def load(device_map):
        return load_base_model(source, recipe.model, recipe.quant, dtype=param_dtype, device_map=device_map,
                               storage=placement.storage_dtype(recipe, strategy, param_dtype))

    def wrap(base):
        return apply_peft(base, recipe.peft, quantized=recipe.quant.mode != "none",
                          kbit_upcast=placement.kbit_upcast(strategy),
                          gradient_checkpointing=cfg.gradient_checkpointing, total_steps=total_steps)

    fsdp_plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if fsdp_plugin is not None:
        placement.check_checkpointing(bool(fsdp_plugin.activation_checkpointing), cfg.gradient_checkpointing)
    low_mem = (accelerator.distributed_type.value == "FSDP" and accelerator.is_fsdp2 and world > 1
               and fsdp_plugin.cpu_ram_efficient_loading)
    zero3 = deepspeed and world > 1 and accelerator.state.deepspeed_plugin.zero_stage == 3
    if low_mem:  # only rank 0 reads the weights; the others receive their shards
        model = sharding.load_fsdp2(load, wrap, offload=placement.fsdp_offloads(fsdp_plugin), device=accelerator.device)
        fsdp_plugin.auto_wrap_policy = None  # already wrapped
    elif zero3:  # only rank 0 reads the weights; DeepSpeed partitions them from there in prepare()
        with sharding.without_hf_zero3(accelerator.state.deepspeed_plugin), streaming_malloc():
            model = sharding.load_zero3(load, wrap, device=accelerator.device)
    else:
        model = wrap(load(placement.device_map_for(strategy, recipe.model.device_map, accelerator.device)))
    load_s = time.perf_counter() - load_start
    load_rss_gb = metrics.host_rss_gb(peak=True) - rss_before  # host memory the load added at its peak
    trainable, total_params = count_parameters(model)
    say(f"model {recipe.model.name}: trainable {trainable:,} / total {total_params:,} parameters "
        f"({100 * trainable / total_params:.3f}%), strategy {strategy}, {world} process(es)")
    say(f"data: {json.dumps(stats)}")

    fsdp1 = accelerator.distributed_type.value == "FSDP" and not accelerator.is_fsdp2
    if accelerator.distributed_type.value == "FSDP" and not low_mem:
        model = _prepare_fsdp(model, accelerator)  # before the optimizer: it must see the sharded parameters
    optimizer_name = placement.optimizer_for(strategy, cfg.optimizer, recipe.dist.fsdp_version)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg, optimizer_name)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    if fsdp1:
        optimizer = accelerator.prepare(optimizer)
    else:
        with streaming_malloc() if zero3 else contextlib.nullcontext():
            model, optimizer = accelerator.prepare(model, optimizer)
    from accelerate.data_loader import prepare_data_loader

    # Our sampler already gives each rank its share; accelerate only tracks the epoch end
    # (so accumulate() syncs on the last short window) and does no further sharding.
    if recipe.data.streaming:
        base_dl = data.make_stream_loader(recipe.data, tokenizer, cfg.micro_batch_size, rank, world)
    else:
        base_dl = data.make_loader(train_ex, cfg.micro_batch_size, rank, world, cfg.seed, tokenizer.pad_token_id,
                                   remainder=recipe.data.remainder, group_by_length=recipe.data.group_by_length)
    train_dl = prepare_data_loader(base_dl, num_processes=1, process_index=0)
    eval_dl = data.make_loader(eval_ex, cfg.micro_batch_size, rank, world, cfg.seed, tokenizer.pad_token_id,
                               shuffle=False, remainder="pad")  # every eval sample counts once

    progress = checkpoint.Progress()
    accelerator.register_for_checkpointing(scheduler, progress)
    accelerator.register_save_state_pre_hook(checkpoint.trainable_only_hook)
    last = checkpoint.newest(run_dir) if resume else None
    if last is not None:
        checkpoint.load(accelerator, last)
        progress.restarts += 1
        say(f"resumed from {last} at step {progress.step} (restart {progress.restarts})")
    start_step = progress.step

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if os.environ.get(preempt.UNDER_JOB):
            (run_dir / preempt.MARKER).unlink(missing_ok=True)  # a stop request from the Slurm task stays
        else:
            preempt.clear(run_dir)
        save_recipe(recipe, run_dir / "recipe.yaml")
        tokenizer.save_pretrained(run_dir)
    accelerator.init_trackers("tensorboard", config=_flat(recipe.model_dump(mode="json")))
    log = metrics.MetricsLog(run_dir / "metrics.jsonl", accelerator)
    ids_log = metrics.SampleIdLog(run_dir, rank, recipe.data.log_sample_ids)

    if eval_ex and progress.step == 0:  # the baseline the run improves on
        log.write({"step": 0, "eval_loss": evaluate(model, eval_dl, accelerator, cfg.eval_batches)})
    model.train()
    bar = tqdm(total=total_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc="train")
    loop_start, first_step_s, run_tokens = time.perf_counter(), None, 0
    window_loss = torch.zeros((), device=accelerator.device)
    window_micro, window_tokens, window_start = 0, 0, time.perf_counter()
    grad_norm, eval_loss, interrupted, last_loss = None, None, False, None
    while progress.step < total_steps and not interrupted:
        epoch_dl = accelerator.skip_first_batches(train_dl, progress.batches_in_epoch) if progress.batches_in_epoch else train_dl
        # accelerate's loader re-seeds the sampler from its own epoch counter on every
        # iteration, so tell the loader (not just our sampler) which epoch this is.
        epoch_dl.set_epoch(progress.epoch)
        for batch in epoch_dl:
            ids = batch.pop("sample_ids")
            ids_log.write({"step": progress.step, "epoch": progress.epoch, "ids": ids.tolist()})
            real = int(batch.pop("real_tokens"))  # counted on the host: no device sync
            window_tokens += real
            run_tokens += real
            with accelerator.accumulate(model):
                loss, _ = forward_loss(model, batch, accelerator.device)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                    if recipe.peft.method == "adalora":
                        accelerator.unwrap_model(model).base_model.update_and_allocate(progress.step)
                optimizer.zero_grad()
            window_loss += loss.detach().float()
            window_micro += 1
            progress.batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            if first_step_s is None:
                first_step_s = metrics.process_age_s()  # process start to the end of the first step
            bar.update(1)
            step = progress.step
            if step % cfg.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                stats_t = accelerator.reduce(torch.stack([window_loss / window_micro,
                                                          torch.tensor(float(window_tokens), device=accelerator.device)]),
                                             reduction="sum")
                row = {"step": step, "epoch": progress.epoch, "loss": stats_t[0].item() / world,
                       "lr": scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "tokens_per_s": stats_t[1].item() / max(elapsed, 1e-9),
                       "peak_mem_gb": metrics.peak_memory_gb(accelerator.device)}
                log.write(row)
                last_loss = row["loss"]
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                window_loss.zero_()
                window_micro, window_tokens, window_start = 0, 0, time.perf_counter()
            if eval_ex and (step % cfg.eval_every == 0 or step == total_steps):
                eval_loss = evaluate(model, eval_dl, accelerator, cfg.eval_batches)
                log.write({"step": step, "eval_loss": eval_loss})
                say(f"step {step}: eval_loss {eval_loss:.4f}")
            interrupted = step < total_steps and stop.agreed(accelerator, world)
            if interrupted or step % cfg.save_every == 0 or step == total_steps:
                checkpoint.save(accelerator, run_dir, step, cfg.keep_checkpoints,
                                {"step": step, "epoch": progress.epoch, "eval_loss": eval_loss})
            if interrupted or step >= total_steps:
                break
        else:  # epoch finished
            progress.epoch += 1
            progress.batches_in_epoch = 0
    bar.close()
    loop_s = time.perf_counter() - loop_start
    if interrupted:  # the checkpoint holds everything; the adapter is written when the run ends
        if accelerator.is_main_process:
            preempt.mark(run_dir, progress.step, stop.signum)
        say(f"stopped at step {progress.step} on a stop signal; checkpoint saved, resume continues from it")
        accelerator.end_training()
        return {"steps": progress.step, "interrupted": True, "restarts": progress.restarts}, accelerator.unwrap_model(model)

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    adapter = sharding.trainable_state(model, accelerator)  # gathered from every rank's shard
    ids_log.close({"done": progress.step, "adapter_sha256": sharding.digest(adapter)})
    if accelerator.is_main_process:
        _save_adapter(unwrapped, adapter, run_dir)
    accelerator.wait_for_everyone()
    summary = {"steps": progress.step, "eval_loss": eval_loss, "trainable_params": trainable,
               "total_params": total_params, "processes": world, "strategy": strategy, "optimizer": optimizer_name,
               "restarts": progress.restarts, "peak_mem_gb_per_rank": _gather(round(metrics.peak_memory_gb(accelerator.device), 3), world),
               "load_host_gb_per_rank": _gather(round(load_rss_gb, 3), world),
               "load_s": round(load_s, 2), "first_step_s": first_step_s and round(first_step_s, 2),
               "train_loop_s": round(loop_s, 2), "tokens_per_s_rank0": round(run_tokens / max(loop_s, 1e-9), 1),
               "tokens_per_s": round(sum(_gather(run_tokens, world)) / max(loop_s, 1e-9), 1),
               "step_s": round(loop_s / max(progress.step - start_step, 1), 4), "final_loss": last_loss}
    if accelerator.device.type == "cuda":  # what the allocator held (allocated + cache): what nvidia-smi sees, less the context
        summary["peak_reserved_gb_per_rank"] = _gather(round(torch.cuda.max_memory_reserved(accelerator.device) / 2**30, 3), world)
    if recipe.data.streaming:  # drops are only known as the stream is read: report them at the end
        c = base_dl.dataset.counts
        summary["stream_rank0"] = {"dropped_empty": c.dropped_empty, "dropped_too_long": c.dropped_long,
                                   "truncated": c.truncated}
        say(f"stream (rank 0): {json.dumps(summary['stream_rank0'])} (dropped samples trained as loss-free fillers)")
    if accelerator.is_main_process:
        first_eval = next((r["eval_loss"] for r in metrics.read(run_dir / "metrics.jsonl") if "eval_loss" in r), None)
        summary["first_eval_loss"] = first_eval
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        metrics.plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
        say(f"adapter saved to {run_dir} (adapter_config.json, adapter_model.safetensors); loss curve {run_dir / 'loss.png'}")
    accelerator.end_training()
    return summary, unwrapped


# What gloo and NCCL say when the other end of a collective has died (seen: gloo's "Connection
# closed by peer ... typically caused by a remote worker crashing").
PEER_GONE = re.compile(r"closed by peer|reset by peer|remote worker|Broken pipe|communicator was aborted|"
                       r"NCCL error.*remote process exited", re.IGNORECASE)


def main(argv: list[str] | None = None) -> int:
    """Per-process entry for `accelerate launch -m launcher.train [RECIPE] [key=value ...] [--resume]`."""
    if (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", 1)) > 1
            and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"):
        # accelerate's multi-GPU launcher does not pass use_cpu on; without it DDP ranks see no
        # distribution. (Not for DeepSpeed: use_cpu would silently turn it into plain DDP.)
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    argv = list(sys.argv[1:] if argv is None else argv)
    resume = "--resume" in argv
    argv = [a for a in argv if a != "--resume"]
    path = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if path else argv
    try:
        train(load_recipe(path, overrides), resume=resume)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except RuntimeError as e:  # a collective whose peer is gone: the launcher reports the dead rank itself
        if int(os.environ.get("WORLD_SIZE", 1)) == 1 or not PEER_GONE.search(str(e)):
            raise
        print(f"rank {os.environ.get('RANK', '?')}: stopping, another rank is gone ({first_line(e)[:160]})",
              file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # a clean exit: gloo threads left running can abort the process
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
