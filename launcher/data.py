"""Data: read samples, render a format, tokenize with prompt masking, shard across ranks, batch.

Each rank gets its own disjoint slice of a seeded per-epoch permutation (not accelerate's
sharding, which pads with duplicates and, under DeepSpeed on CPU, sees one process).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Sampler

from launcher import builtin
from launcher.errors import UserError
from launcher.recipe import DataCfg

IGNORE = -100
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def read_samples(path: str) -> list[dict]:
    """Rows of a JSONL or JSON-list file (or the built-in arithmetic set)."""
    p = builtin.arithmetic_path() if path == builtin.ARITHMETIC else Path(path)
    if not p.is_file():
        raise UserError(f"data.path: file not found: {path}")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            rows = json.loads(text)
            rows = rows.get("data", rows) if isinstance(rows, dict) else rows
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise UserError(f"data.path: {path} is not valid JSON/JSONL (line {e.lineno}: {e.msg})") from None
    if not rows:
        raise UserError(f"data.path: {path} holds no samples")
    if not all(isinstance(r, dict) for r in rows):
        raise UserError(f"data.path: {path}: every sample must be a JSON object")
    return rows


def detect_format(row: dict, cfg: DataCfg) -> str:
    if cfg.format != "auto":
        return cfg.format
    if cfg.messages_field in row:
        return "chat"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if cfg.prompt_field in row and cfg.completion_field in row:
        return "prompt_completion"
    if cfg.text_field in row:
        return "text"
    raise UserError(f"data.format: cannot tell the format from fields {sorted(row)}; set data.format and its field names")


def _field(row: dict, name: str, i: int, hint: str):
    if name not in row:
        raise UserError(f"data: sample {i} has no field {name!r} (fields: {sorted(row)}); set {hint}")
    return row[name]


def render(row: dict, fmt: str, cfg: DataCfg, tokenizer, i: int) -> tuple[str, str]:
    """(prompt, completion) strings; the prompt is masked out of the loss unless train_on_prompt."""
    if fmt == "prompt_completion":
        return (str(_field(row, cfg.prompt_field, i, "data.prompt_field")),
                str(_field(row, cfg.completion_field, i, "data.completion_field")))
    if fmt == "alpaca":
        inp = row.get("input") or ""
        prompt = ALPACA_PROMPT.format(instruction=_field(row, "instruction", i, "data.format"),
                                      input_block=f"### Input:\n{inp}\n\n" if inp else "")
        return prompt, str(_field(row, "output", i, "data.format"))
    if fmt == "text":
        return "", str(_field(row, cfg.text_field, i, "data.text_field"))
    messages = _field(row, cfg.messages_field, i, "data.messages_field")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("data.format: chat needs a tokenizer with a chat template; this tokenizer has none")
    if not messages or messages[-1].get("role") != "assistant":
        raise UserError(f"data: sample {i}: the last chat message must be the assistant's")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return prompt, str(messages[-1].get("content", ""))


@dataclass
class Tokenized:
    examples: list[dict]
    dropped_empty: int = 0
    dropped_long: int = 0
    truncated: int = 0
    stats: dict = field(default_factory=dict)


def tokenize(rows: list[dict], cfg: DataCfg, tokenizer) -> Tokenized:
    """input_ids/labels per sample; labels are -100 on prompt tokens (unless train_on_prompt)."""
    fmt = detect_format(rows[0], cfg)
    out = Tokenized(examples=[])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    for i, row in enumerate(rows):
        prompt, completion = render(row, fmt, cfg, tokenizer, i)
        if not completion.strip():
            out.dropped_empty += 1
            continue
        p_ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
        ids = p_ids + c_ids
        labels = (p_ids if cfg.train_on_prompt else [IGNORE] * len(p_ids)) + c_ids
        if len(ids) > cfg.max_seq_len:
            if cfg.too_long == "error":
                raise UserError(f"data: sample {i} has {len(ids)} tokens > data.max_seq_len={cfg.max_seq_len} "
                                "(raise it, or set data.too_long=truncate/drop)")
            if cfg.too_long == "drop" or len(p_ids) >= cfg.max_seq_len:
                out.dropped_long += 1
                continue
            ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
            out.truncated += 1
        out.examples.append({"id": i, "input_ids": ids, "labels": labels})
    if not out.examples:
        raise UserError(f"data: no usable samples in {cfg.path} (empty: {out.dropped_empty}, too long: {out.dropped_long})")
    out.stats = {"format": fmt, "samples": len(out.examples), "dropped_empty": out.dropped_empty,
                 "dropped_too_long": out.dropped_long, "truncated": out.truncated}
    return out


def split_eval(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded hold-out of `fraction` of the samples (at least one when fraction > 0)."""
    if fraction <= 0:
        return examples, []
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise UserError(f"data.eval_fraction: {fraction} leaves no training samples out of {len(examples)}")
    eval_ids = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in eval_ids], [e for i, e in enumerate(examples) if i in eval_ids])


class ShardSampler(Sampler):
    """This rank's disjoint share of a seeded per-epoch permutation.

    Every rank gets exactly len // world samples so all ranks run the same number of steps;
    the len % world remainder of each epoch's permutation is skipped (different samples
    each epoch). With shuffle off the order is the file order.
    """

    def __init__(self, n: int, rank: int, world: int, seed: int, shuffle: bool = True):
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = len(self)
        return iter(order[self.rank * per_rank:(self.rank + 1) * per_rank])


class PadCollator:
    """Right-pads a batch to its longest sample; pads are masked from attention and loss."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"])
            labels[row, :n] = torch.tensor(b["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "sample_ids": torch.tensor([b["id"] for b in batch])}


def make_loader(examples: list[dict], batch_size: int, rank: int, world: int, seed: int, pad_id: int,
                shuffle: bool = True) -> torch.utils.data.DataLoader:
    sampler = ShardSampler(len(examples), rank, world, seed, shuffle)
    # Its own generator: otherwise every new iterator draws a seed from the global RNG, and a
    # resumed run (which opens one more iterator) would get different dropout masks.
    return torch.utils.data.DataLoader(examples, batch_size=batch_size, sampler=sampler, collate_fn=PadCollator(pad_id),
                                       generator=torch.Generator().manual_seed(seed))


def batches_per_epoch(n: int, world: int, batch_size: int) -> int:
    return math.ceil((n // world) / batch_size)


def load_data(cfg: DataCfg, tokenizer, seed: int) -> tuple[list[dict], list[dict], dict]:
    """Train and eval examples plus counts to report."""
    train = tokenize(read_samples(cfg.path)[: cfg.max_samples], cfg, tokenizer)
    if cfg.eval_path:
        evals = tokenize(read_samples(cfg.eval_path), cfg, tokenizer).examples
        train_ex = train.examples
    else:
        train_ex, evals = split_eval(train.examples, cfg.eval_fraction, seed)
    stats = dict(train.stats, train_samples=len(train_ex), eval_samples=len(evals))
    return train_ex, evals, stats
