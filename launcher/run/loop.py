"""The training loop, one component with one job: batches in, optimizer steps out, with a log line,
an eval and a checkpoint on their schedules and a stop signal honoured at a step boundary.

`fit` is the loop in the spirit of accelerate's complete example; `train_step` is one micro batch's
forward, backward and (at the end of an accumulation window) step; `Meter` owns the logging window.
`train.py` sets everything up and finishes the run around it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from launcher.config.recipe import TrainCfg
from launcher.run import answers, checkpoint, console, data, metrics, sharding
from launcher.run.context import RunContext

if TYPE_CHECKING:  # annotations only
    from accelerate import Accelerator


def forward_loss(model: torch.nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, int]:
    """(mean loss over the batch's label tokens, their count). The count is computed on the host
    and passed in, so a batch of loss-free fillers gives 0 with zero gradients instead of 0/0.
    use_cache=False keeps packed rows block-diagonal: transformers only reads packing from
    position ids when there is no cache."""
    n = int((batch["labels"][:, 1:] != data.IGNORE).sum())
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return model(**batch, use_cache=False, num_items_in_batch=max(n, 1)).loss, n


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, accelerator: Accelerator, max_batches: int | None) -> float:
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


@dataclass
class Evals:
    """The eval set: loss batches, and the prompts answered for eval_accuracy (empty: off)."""

    loader: object
    prompts: list
    tokenizer: object
    example: tuple | None = None  # (prompt, answer, expected) from the latest eval_accuracy

    def run(self, ctx: RunContext) -> dict:
        """{"eval_loss", and "eval_accuracy" when prompts are set}, reduced over ranks."""
        cfg: TrainCfg = ctx.recipe.train
        row = {"eval_loss": evaluate(ctx.model, self.loader, ctx.accelerator, cfg.eval_batches)}
        if self.prompts:
            scored = answers.score(
                ctx.model,
                self.prompts,
                self.tokenizer,
                ctx.accelerator,
                ctx.placement.rank,
                ctx.placement.world,
                cfg.micro_batch_size,
                cfg.eval_max_new_tokens,
            )
            row["eval_accuracy"] = scored.accuracy
            self.example = scored.example
        return row


def eval_line(step: int, row: dict, prompts: int) -> str:
    line = f"step {step}: eval_loss {row['eval_loss']:.4f}"
    if "eval_accuracy" in row:
        line += f", eval_accuracy {100 * row['eval_accuracy']:.1f}% ({prompts} prompts)"
    return line


class Meter:
    """The logging window: loss summed on the device (no host sync per step), tokens counted on the
    host; `row()` reduces over ranks once per log line and starts a new window."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.micro = self.tokens = 0
        self.grad_norm: torch.Tensor | None = None
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor | None = None) -> None:
        self.loss += loss.detach().float()
        self.micro += 1
        if grad_norm is not None:  # the latest clip's norm, logged with the window
            self.grad_norm = grad_norm

    def row(self, accelerator: Accelerator, world: int, step: int, epoch: int, lr: float) -> dict:
        """The metrics.jsonl line for the window that ends at `step` (one reduce over ranks)."""
        elapsed = time.perf_counter() - self.start
        both = accelerator.reduce(
            torch.stack([self.loss / self.micro, torch.tensor(float(self.tokens), device=accelerator.device)]),
            reduction="sum",
        )
        self.loss.zero_()
        self.micro = self.tokens = 0
        self.start = time.perf_counter()
        return {
            "step": step,
            "epoch": epoch,
            "loss": both[0].item() / world,
            "lr": lr,
            "grad_norm": float(self.grad_norm) if self.grad_norm is not None else None,
            "tokens_per_s": both[1].item() / max(elapsed, 1e-9),
            "peak_mem_gb": metrics.peak_memory_gb(accelerator.device),
        }


@dataclass
class Fitted:
    """What the loop leaves for the summary."""

    interrupted: bool = False
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    last_loss: float | None = None
    tokens: int = 0  # this rank's real (non-pad) tokens
    loop_s: float = 0.0
    first_step_s: float | None = None
    start_step: int = 0
    ids_log: metrics.SampleIdLog | None = None
    shown: dict = field(default_factory=dict)  # the progress bar's loss and accuracy


def train_step(ctx: RunContext, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward and backward of one micro batch; at the end of an accumulation window also clip, step
    the optimizer and the schedule. Returns (loss, the gradient norm when clipped, else None)."""
    model, optimizer, accelerator = ctx.model, ctx.optimizer, ctx.accelerator
    max_grad_norm = ctx.recipe.train.max_grad_norm
    grad_norm = None
    with accelerator.accumulate(model):
        loss, _ = forward_loss(model, batch, accelerator.device)
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        if accelerator.sync_gradients:
            ctx.scheduler.step()
            if ctx.recipe.peft.method == "adalora":
                sharding.unwrap(model).base_model.update_and_allocate(ctx.progress.step)
        optimizer.zero_grad()
    return loss, grad_norm


def fit(ctx: RunContext, train_dl, evals: Evals | None, total_steps: int) -> Fitted:
    """The loop, as in accelerate's complete example: accumulate, backward, clip, step; a log line,
    an eval and a checkpoint on their schedules; a stop signal ends it at a step boundary."""
    from tqdm.auto import tqdm

    accelerator, progress = ctx.accelerator, ctx.progress
    log = metrics.MetricsLog(ctx.run_dir / "metrics.jsonl", accelerator)
    ids_log = metrics.SampleIdLog(ctx.run_dir, ctx.placement.rank, ctx.recipe.data.log_sample_ids)
    if evals is not None and progress.step == 0:  # the baseline the run improves on
        row = evals.run(ctx)
        log.write({"step": 0, **row})
        console.say(eval_line(0, row, len(evals.prompts)))
    ctx.model.train()
    bar = tqdm(
        total=total_steps,
        initial=progress.step,
        disable=not accelerator.is_local_main_process or console.level() < console.NORMAL,
        desc="train",
        mininterval=console.bar_interval(),
    )
    out, meter = Fitted(start_step=progress.step), Meter(accelerator.device)
    loop_start = time.perf_counter()
    try:  # the bar ends its line before an error is printed below it
        while progress.step < total_steps and not out.interrupted:
            epoch_dl = data.from_batch(accelerator, train_dl, progress.batches_in_epoch)
            # accelerate's loader re-seeds the sampler from its own epoch counter on every
            # iteration, so tell the loader (not just our sampler) which epoch this is.
            epoch_dl.set_epoch(progress.epoch)
            for batch in epoch_dl:
                ids_log.write({"step": progress.step, "epoch": progress.epoch, "ids": batch.pop("sample_ids").tolist()})
                real = int(batch.pop("real_tokens"))  # counted on the host: no device sync
                meter.tokens += real
                out.tokens += real
                loss, norm = train_step(ctx, batch)
                meter.add(loss, norm)
                progress.batches_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                progress.step += 1
                if ctx.watch is not None:
                    ctx.watch.beat(progress.step)
                out.first_step_s = out.first_step_s or metrics.process_age_s()  # process start to the first step's end
                bar.update(1)
                after_step(ctx, out, meter, log, evals, bar, total_steps)
                if out.interrupted or progress.step >= total_steps:
                    break
            else:  # epoch finished
                progress.epoch += 1
                progress.batches_in_epoch = 0
    finally:
        bar.close()
    out.loop_s = time.perf_counter() - loop_start
    out.ids_log = ids_log  # closed by finish() with the adapter's digest
    return out


def after_step(ctx: RunContext, out: Fitted, meter: Meter, log, evals: Evals | None, bar, total_steps: int) -> None:
    """What follows an optimizer step, each on its schedule: the log line, the eval, the stop check
    (every rank agrees) and the checkpoint. Seven values, all the loop's own state."""
    cfg, accelerator, step = ctx.recipe.train, ctx.accelerator, ctx.progress.step
    if step % cfg.log_every == 0 or step == total_steps:
        lr = ctx.scheduler.get_last_lr()[0]
        row = meter.row(accelerator, ctx.placement.world, step, ctx.progress.epoch, lr)
        log.write(row)
        out.last_loss = row["loss"]
        out.shown["loss"] = f"{out.last_loss:.3f}"
        bar.set_postfix(out.shown, refresh=False)
    if evals is not None and (step % cfg.eval_every == 0 or step == total_steps):
        row = evals.run(ctx)
        out.eval_loss, out.eval_accuracy = row["eval_loss"], row.get("eval_accuracy")
        log.write({"step": step, **row})
        if out.eval_accuracy is not None:
            out.shown["acc"] = f"{100 * out.eval_accuracy:.0f}%"
            bar.set_postfix(out.shown, refresh=False)
        if accelerator.is_main_process and console.level() >= console.NORMAL:
            bar.write(eval_line(step, row, len(evals.prompts)))
    out.interrupted = step < total_steps and ctx.stop is not None and ctx.stop.agreed(accelerator, ctx.placement.world)
    if out.interrupted or step % cfg.save_every == 0 or step == total_steps:
        meta = {
            "step": step,
            "epoch": ctx.progress.epoch,
            "eval_loss": out.eval_loss,
            "progress": ctx.progress.state_dict(),  # JSON, read back by checkpoint.load (no pickle)
            "scheduler": ctx.scheduler.state_dict(),
        }
        deepspeed = ctx.placement.deepspeed
        checkpoint.save(accelerator, ctx.run_dir, step, cfg.keep_checkpoints, meta, deepspeed=deepspeed)
