"""The training loop: one accelerate-native function from recipe to saved adapter.

Run directly by `launcher train`, or per process by
`accelerate launch -m launcher.train RECIPE [key=value ...]`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from launcher import checkpoint, data, metrics
from launcher.errors import UserError
from launcher.model import apply_peft, count_parameters, load_base_model, load_tokenizer, resolve_source
from launcher.optim import build_optimizer, build_scheduler
from launcher.placement import device_map_for, kbit_upcast, rank_and_world, resolve_strategy
from launcher.recipe import Recipe, load_recipe, save_recipe


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    """Never silently train over an earlier run's checkpoints or metrics."""
    if not resume and ((run_dir / "metrics.jsonl").exists() or checkpoint.list_complete(run_dir)):
        raise UserError(f"train.output_dir: {run_dir} already holds a run; add --resume to continue it, "
                        "or choose another train.output_dir")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


@torch.no_grad()
def evaluate(model, loader, accelerator, max_batches: int | None) -> float:
    """Token-weighted mean loss over this rank's eval shard, reduced over ranks."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch.pop("sample_ids")
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        n = (batch["labels"][:, 1:] != data.IGNORE).sum()
        total += torch.stack([model(**batch).loss.float() * n, n.float()])
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1].clamp(min=1)).item()


def train(recipe: Recipe, resume: bool = False) -> tuple[dict, torch.nn.Module]:
    """Run the recipe; returns (summary, the trained peft model unwrapped from accelerate)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    cfg = recipe.train
    run_dir = Path(cfg.output_dir)
    _check_run_dir(run_dir, resume)
    strategy = resolve_strategy(recipe.dist)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=_mixed_precision(cfg.mixed_precision),
        log_with=cfg.report_to or None,
        project_dir=str(run_dir),
    )
    rank, world = rank_and_world()
    if world > 1 and accelerator.distributed_type.value == "NO":
        raise UserError(f"{world} processes were launched but accelerate sees one, so gradients would not sync; "
                        "on a CPU machine set ACCELERATE_USE_CPU=true (or use_cpu: true in the accelerate config)")
    say = accelerator.print
    set_seed(cfg.seed)

    with accelerator.main_process_first():  # rank 0 builds the tiny model once; others read it
        source = resolve_source(recipe.model)
    tokenizer = load_tokenizer(source, recipe.model)
    train_ex, eval_ex, stats = data.load_data(recipe.data, tokenizer, cfg.seed)
    batches = data.batches_per_epoch(len(train_ex), world, cfg.micro_batch_size)
    if batches == 0:
        raise UserError(f"data: {len(train_ex)} training samples cannot feed {world} processes")
    steps_per_epoch = math.ceil(batches / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    model = load_base_model(source, recipe.model, recipe.quant, device_map=device_map_for(strategy, accelerator))
    model = apply_peft(model, recipe.peft, quantized=recipe.quant.mode != "none", kbit_upcast=kbit_upcast(strategy),
                       gradient_checkpointing=cfg.gradient_checkpointing, total_steps=total_steps)
    trainable, total_params = count_parameters(model)
    say(f"model {recipe.model.name}: trainable {trainable:,} / total {total_params:,} parameters "
        f"({100 * trainable / total_params:.3f}%), strategy {strategy}, {world} process(es)")
    say(f"data: {json.dumps(stats)}")

    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    from accelerate.data_loader import prepare_data_loader

    # Our sampler already gives each rank its share; accelerate only tracks the epoch end
    # (so accumulate() syncs on the last short window) and does no further sharding.
    train_dl = prepare_data_loader(
        data.make_loader(train_ex, cfg.micro_batch_size, rank, world, cfg.seed, tokenizer.pad_token_id),
        num_processes=1, process_index=0)
    eval_dl = data.make_loader(eval_ex, cfg.micro_batch_size, rank, world, cfg.seed, tokenizer.pad_token_id, shuffle=False)

    progress = checkpoint.Progress()
    accelerator.register_for_checkpointing(scheduler, progress)
    accelerator.register_save_state_pre_hook(checkpoint.trainable_only_hook)
    last = checkpoint.newest(run_dir) if resume else None
    if last is not None:
        checkpoint.load(accelerator, last)
        progress.restarts += 1
        say(f"resumed from {last} at step {progress.step} (restart {progress.restarts})")

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
        tokenizer.save_pretrained(run_dir)
    accelerator.init_trackers("tensorboard", config=_flat(recipe.model_dump(mode="json")))
    log = metrics.MetricsLog(run_dir / "metrics.jsonl", accelerator)

    if eval_ex and progress.step == 0:  # the baseline the run improves on
        log.write({"step": 0, "eval_loss": evaluate(model, eval_dl, accelerator, cfg.eval_batches)})
    model.train()
    bar = tqdm(total=total_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc="train")
    window_loss = torch.zeros((), device=accelerator.device)
    window_micro, window_tokens, window_start = 0, 0, time.perf_counter()
    grad_norm, eval_loss = None, None
    while progress.step < total_steps:
        epoch_dl = accelerator.skip_first_batches(train_dl, progress.batches_in_epoch) if progress.batches_in_epoch else train_dl
        # accelerate's loader re-seeds the sampler from its own epoch counter on every
        # iteration, so tell the loader (not just our sampler) which epoch this is.
        epoch_dl.set_epoch(progress.epoch)
        for batch in epoch_dl:
            batch.pop("sample_ids")
            window_tokens += int(batch["attention_mask"].sum())  # counted on the host: no device sync
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            with accelerator.accumulate(model):
                loss = model(**batch).loss
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
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                window_loss.zero_()
                window_micro, window_tokens, window_start = 0, 0, time.perf_counter()
            if eval_ex and (step % cfg.eval_every == 0 or step == total_steps):
                eval_loss = evaluate(model, eval_dl, accelerator, cfg.eval_batches)
                log.write({"step": step, "eval_loss": eval_loss})
                say(f"step {step}: eval_loss {eval_loss:.4f}")
            if step % cfg.save_every == 0 or step == total_steps:
                checkpoint.save(accelerator, run_dir, step, cfg.keep_checkpoints,
                                {"step": step, "epoch": progress.epoch, "eval_loss": eval_loss})
            if step >= total_steps:
                break
        else:  # epoch finished
            progress.epoch += 1
            progress.batches_in_epoch = 0
    bar.close()

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(run_dir, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save, state_dict=accelerator.get_state_dict(model))
    summary = {"steps": progress.step, "eval_loss": eval_loss, "trainable_params": trainable,
               "total_params": total_params, "processes": world, "strategy": strategy, "restarts": progress.restarts}
    if accelerator.is_main_process:
        first_eval = next((r["eval_loss"] for r in metrics.read(run_dir / "metrics.jsonl") if "eval_loss" in r), None)
        summary["first_eval_loss"] = first_eval
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        metrics.plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
        say(f"adapter saved to {run_dir} (adapter_config.json, adapter_model.safetensors); loss curve {run_dir / 'loss.png'}")
    accelerator.end_training()
    return summary, unwrapped


def main(argv: list[str] | None = None) -> int:
    """Per-process entry for `accelerate launch -m launcher.train [RECIPE] [key=value ...] [--resume]`."""
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
