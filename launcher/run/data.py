"""Data: read samples, render a format, tokenize with prompt masking, shard across ranks, batch.

Each rank gets its own disjoint slice of a seeded per-epoch permutation (not accelerate's
sharding, which pads with duplicates and, under DeepSpeed on CPU, sees one process).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Sampler

from launcher.config import userio
from launcher.config.errors import UserError
from launcher.config.recipe import DataCfg
from launcher.config.userio import quote
from launcher.demo import builtin

if TYPE_CHECKING:  # annotations only
    from transformers import PreTrainedTokenizerBase

IGNORE = -100
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def local_path(path: str) -> Path:
    """The file or directory a data path names (builtin:subtraction, builtin:arithmetic: files the package ships)."""
    return builtin.data_path(path) if path in builtin.DATA else Path(path).expanduser()


def read_samples(path: str, split: str = "train", field: str = "data.path") -> list[dict]:
    """Rows from a JSONL/JSON file (read directly), CSV/Parquet or a save_to_disk directory
    (through `datasets`), a hub dataset name, or the built-in arithmetic set. Errors name `field`
    (data.path or data.eval_path), the file and, for JSON Lines, the line."""
    p = local_path(path)
    if p.is_dir():
        rows = _from_datasets(path, lambda ds: ds.load_from_disk(str(p)), split, field)
    elif p.suffix in (".csv", ".parquet"):
        rows = _from_datasets(
            path, lambda ds: ds.load_dataset(p.suffix[1:], data_files=str(p), split="train"), split, field
        )
    elif p.is_file():
        rows = _read_json(p, field)
    elif p.exists():  # a named pipe, a socket, a device: a run reads its data more than once
        raise UserError(f"{field}: {path} is not a regular file (a pipe or device); write the samples to a file")
    elif path.startswith((".", "/", "~")) or p.suffix in (".json", ".jsonl"):
        raise UserError(f"{field}: file not found: {path}")
    else:  # a hub dataset name
        rows = _from_datasets(path, lambda ds: ds.load_dataset(path, split=split), split, field)
    if not rows:
        raise UserError(f"{field}: {path} holds no samples")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(
                f"{field}: {path}: sample {i} is a JSON {type(row).__name__}; every sample must be "
                "a JSON object (one per line in .jsonl)"
            )
    return rows


def _read_json(p: Path, field: str) -> list:
    """A .json file holds a list of objects (or {"data": [...]}); anything else is JSON Lines."""
    if p.suffix != ".json":
        return userio.read_jsonl(p, field)
    rows = userio.read_json(p, field, expect=None)
    if isinstance(rows, dict) and isinstance(rows.get("data"), list):
        return rows["data"]
    if not isinstance(rows, list):
        raise UserError(
            f'{field}: {p} must hold a JSON list of samples (or {{"data": [...]}}), not a JSON {type(rows).__name__}'
        )
    return rows


def _from_datasets(path: str, load, split: str, field: str) -> list[dict]:
    import datasets

    try:
        ds = load(datasets)
    except Exception as e:  # datasets raises many types for a missing name, bad file or no network
        raise UserError(f"{field}: cannot read {quote(path)} with datasets: {userio.first_line(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            which = "data.eval_split" if field == "data.eval_path" else "data.split"
            raise UserError(f"{which}: {path} has splits {sorted(ds)}, not {quote(split)}")
        ds = ds[split]
    return ds.to_list()


def detect_format(row: dict, cfg: DataCfg) -> str:
    if cfg.format != "auto":
        return cfg.format
    if cfg.messages_field in row:
        return "chat"
    if cfg.instruction_field in row and cfg.output_field in row:
        return "alpaca"
    if cfg.prompt_field in row and cfg.completion_field in row:
        return "prompt_completion"
    if cfg.text_field in row:
        return "text"
    raise UserError(
        f"data.format: cannot tell the format from fields {quote(sorted(row), 200)}; "
        "set data.format and its field names"
    )


def _field(row: dict, name: str, i: int, hint: str):
    if name not in row:
        raise UserError(f"data: sample {i} has no field {quote(name)} (fields: {quote(sorted(row), 200)}); set {hint}")
    return row[name]


def _text(row: dict, name: str, i: int, hint: str) -> str:
    """A text field: null is empty (an empty completion drops the sample, counted), a number is its
    digits; a list, mapping or boolean is a data error, never its Python repr trained on."""
    value = _field(row, name, i, hint)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(
            f"data: sample {i}: field {quote(name)} holds a {type(value).__name__} "
            f"({quote(value)}); expected text ({hint})"
        )
    return str(value)


def _messages(row: dict, cfg: DataCfg, i: int) -> list[dict]:
    """Chat messages: a list of {"role": str, "content": str}, the last one the assistant's."""
    messages = _field(row, cfg.messages_field, i, "data.messages_field")
    shape = (
        f'data: sample {i}: field {quote(cfg.messages_field)} must be a list of {{"role": ..., "content": ...}} objects'
    )
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{shape}, got {quote(messages)}")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content", ""), str):
            raise UserError(f"{shape}; one is {quote(m)}")
    if messages[-1]["role"] != "assistant":
        raise UserError(
            f"data: sample {i}: the last chat message must be the assistant's, not {quote(messages[-1]['role'])}"
        )
    return messages


def render(row: dict, fmt: str, cfg: DataCfg, tokenizer: PreTrainedTokenizerBase, i: int) -> tuple[str, str]:
    """(prompt, completion) strings; the prompt is masked out of the loss unless train_on_prompt."""
    if fmt == "prompt_completion":
        return (
            _text(row, cfg.prompt_field, i, "data.prompt_field"),
            _text(row, cfg.completion_field, i, "data.completion_field"),
        )
    if fmt == "alpaca":
        inp = _text(row, cfg.input_field, i, "data.input_field") if cfg.input_field in row else ""
        prompt = ALPACA_PROMPT.format(
            instruction=_text(row, cfg.instruction_field, i, "data.instruction_field"),
            input_block=f"### Input:\n{inp}\n\n" if inp else "",
        )
        return prompt, _text(row, cfg.output_field, i, "data.output_field")
    if fmt == "text":
        return "", _text(row, cfg.text_field, i, "data.text_field")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("data.format: chat needs a tokenizer with a chat template; this tokenizer has none")
    messages = _messages(row, cfg, i)
    try:
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template's own checks (jinja raise_exception): roles out of order, ...
        raise UserError(f"data: sample {i}: the tokenizer's chat template refuses it: {userio.first_line(e)}") from None
    return prompt, messages[-1].get("content", "")


@dataclass
class Tokenized:
    examples: list[dict]
    dropped_empty: int = 0
    dropped_long: int = 0
    truncated: int = 0
    stats: dict = field(default_factory=dict)


def tokenize_one(
    row: dict, i: int, fmt: str, cfg: DataCfg, tokenizer: PreTrainedTokenizerBase, counts: Tokenized
) -> dict | None:
    """One sample's input_ids/labels (-100 on prompt tokens unless train_on_prompt); None when dropped (counted)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt, completion = render(row, fmt, cfg, tokenizer, i)
    if not completion.strip():
        counts.dropped_empty += 1
        return None
    p_ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = p_ids + c_ids
    labels = (p_ids if cfg.train_on_prompt else [IGNORE] * len(p_ids)) + c_ids
    if len(ids) > cfg.max_seq_len:
        if cfg.too_long == "error":
            raise UserError(
                f"data: sample {i} has {len(ids)} tokens > data.max_seq_len={cfg.max_seq_len} "
                "(raise it, or set data.too_long=truncate/drop)"
            )
        if cfg.too_long == "drop" or len(p_ids) >= cfg.max_seq_len:
            counts.dropped_long += 1
            return None
        ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
        counts.truncated += 1
    # prompt_len: where the answer starts, for generation-based accuracy (launcher.run.answers)
    return {"id": i, "input_ids": ids, "labels": labels, "prompt_len": len(p_ids)}


def tokenize(rows: list[dict], cfg: DataCfg, tokenizer: PreTrainedTokenizerBase) -> Tokenized:
    """Every row tokenized; empty and too-long samples are dropped or truncated and counted."""
    fmt = detect_format(rows[0], cfg)
    out = Tokenized(examples=[])
    for i, row in enumerate(rows):
        ex = tokenize_one(row, i, fmt, cfg, tokenizer, out)
        if ex is not None:
            out.examples.append(ex)
    if not out.examples:
        raise UserError(
            f"data: no usable samples in {cfg.path} (empty: {out.dropped_empty}, too long: {out.dropped_long})"
        )
    out.stats = {
        "format": fmt,
        "samples": len(out.examples),
        "dropped_empty": out.dropped_empty,
        "dropped_too_long": out.dropped_long,
        "truncated": out.truncated,
    }
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
    return (
        [e for i, e in enumerate(examples) if i not in eval_ids],
        [e for i, e in enumerate(examples) if i in eval_ids],
    )


class ShardSampler(Sampler):
    """This rank's disjoint share of a seeded per-epoch permutation; every rank gets the same count.

    remainder="drop": each rank gets len // world samples and the len % world left over are
    skipped this epoch (different ones each epoch). remainder="pad": each rank gets
    ceil(len / world); the missing places are index -1, a filler that carries no loss, so every
    sample trains exactly once per epoch. With shuffle off the order is the file order.
    """

    def __init__(
        self,
        n: int,
        rank: int,
        world: int,
        seed: int,
        shuffle: bool = True,
        remainder: str = "drop",
        lengths: list[int] | None = None,
        batch_size: int = 1,
    ):
        """The sampler's settings, each a value of the data or train section (or of the eval loader's)."""
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world, seed, shuffle
        self.remainder = remainder
        self.lengths, self.batch_size = lengths, batch_size  # lengths set: group by length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.world) if self.remainder == "pad" else self.n // self.world

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = len(self)
        order += [-1] * (per_rank * self.world - len(order))  # fillers (pad mode only)
        if self.lengths is None:
            return iter(order[self.rank * per_rank : (self.rank + 1) * per_rank])
        return iter(self._by_length(order[: per_rank * self.world])[self.rank :: self.world])

    def _by_length(self, order: list[int]) -> list[int]:
        """Sort by length within windows of 64 global batches, then shuffle the batches: similar
        lengths share a batch while the order stays seeded. Ranks take every world-th sample."""
        window = 64 * self.batch_size * self.world
        lengths = [self.lengths[i] if i >= 0 else 0 for i in order]
        ranked = []
        for start in range(0, len(order), window):
            chunk = sorted(range(start, min(start + window, len(order))), key=lambda j: -lengths[j])
            ranked += [order[j] for j in chunk]
        step = self.batch_size * self.world  # one global batch
        batches = [ranked[i : i + step] for i in range(0, len(ranked), step)]
        g = torch.Generator().manual_seed(self.seed + self.epoch + 1)
        return [i for b in (batches[k] for k in torch.randperm(len(batches), generator=g).tolist()) for i in b]


class Examples(torch.utils.data.Dataset):
    """The examples, where index -1 is a loss-free filler (all labels ignored, id -1)."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        if i >= 0:
            return self.examples[i]
        ex = self.examples[0]
        return dict(ex, id=[-1] if isinstance(ex["id"], list) else -1, labels=[IGNORE] * len(ex["labels"]))


class PadCollator:
    """Right-pads a batch to its longest row. Plain rows get an attention mask; packed rows get
    position ids that restart at every sample (the padding is one more segment) and no mask: the
    attention finds the samples from the positions (launcher.run.attention runs each alone; other
    kernels build a block-diagonal mask), so no sample attends to another."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        packed = "position_ids" in batch[0]
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        extra = torch.zeros((len(batch), width), dtype=torch.long)  # attention mask, or position ids
        sample_ids, real = [], 0
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"])
            labels[row, :n] = torch.tensor(b["labels"])
            if packed:
                extra[row, :n] = torch.tensor(b["position_ids"])
                extra[row, n:] = torch.arange(width - n)
            else:
                extra[row, :n] = 1
            sample_ids += [i for i in (b["id"] if isinstance(b["id"], list) else [b["id"]]) if i >= 0]
            real += n
        out = {"input_ids": ids, "labels": labels, "position_ids" if packed else "attention_mask": extra}
        out["sample_ids"] = torch.tensor(sample_ids, dtype=torch.long)
        out["real_tokens"] = torch.tensor(real)
        return out


def pack(examples: list[dict], max_len: int, seed: int) -> list[dict]:
    """Best-fit packing in a seeded order: each sample goes to the open row it fills the most
    (a new row when none has room). Rows end ~97% full where filling rows in turn leaves ~82%
    (log-normal lengths), so an epoch takes fewer, fuller steps; rows still mix random samples.

    Each sample's positions restart at 0 and its first label is ignored (it would otherwise be
    predicted from the previous sample's last token)."""
    g = torch.Generator().manual_seed(seed)
    packs: list[dict] = []
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted: the best fit is the first with enough room
    for i in torch.randperm(len(examples), generator=g).tolist():
        ex = examples[i]
        n = len(ex["input_ids"])
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, row = room.pop(k)
        else:
            free, row = max_len, len(packs)
            packs.append({"id": [], "input_ids": [], "labels": [], "position_ids": []})
        if free - n > 0:
            bisect.insort(room, (free - n, row))
        cur = packs[row]
        cur["id"].append(ex["id"])
        cur["input_ids"] += ex["input_ids"]
        cur["labels"] += [IGNORE] + ex["labels"][1:]
        cur["position_ids"] += list(range(n))
    return packs


def padding_efficiency(examples: list[dict], batch_size: int, seed: int, group_by_length: bool = False) -> float:
    """Real tokens / tokens computed over one epoch's batches (rows padded to the batch's longest)."""
    lengths = [len(e["input_ids"]) for e in examples]
    order = list(
        ShardSampler(len(examples), 0, 1, seed, lengths=lengths if group_by_length else None, batch_size=batch_size)
    )
    chunks = [[lengths[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]
    return sum(lengths) / max(sum(max(c) * len(c) for c in chunks), 1)


def make_loader(
    examples: list[dict],
    batch_size: int,
    rank: int,
    world: int,
    seed: int,
    pad_id: int,
    shuffle: bool = True,
    remainder: str = "drop",
    group_by_length: bool = False,
) -> torch.utils.data.DataLoader:
    """A loader over this rank's share of `examples`: the sampler's settings (rank, world, seed, shuffle,
    remainder, grouping) and the collator's pad id, each a value from the data and train sections."""
    lengths = [len(e["input_ids"]) for e in examples] if group_by_length else None
    sampler = ShardSampler(len(examples), rank, world, seed, shuffle, remainder, lengths, batch_size)
    # Its own generator: otherwise every new iterator draws a seed from the global RNG, and a
    # resumed run (which opens one more iterator) would get different dropout masks.
    return torch.utils.data.DataLoader(
        Examples(examples),
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=PadCollator(pad_id),
        generator=torch.Generator().manual_seed(seed),
    )


def batches_per_epoch(n: int, world: int, batch_size: int, remainder: str = "drop") -> int:
    per_rank = -(-n // world) if remainder == "pad" else n // world
    return math.ceil(per_rank / batch_size)


def _fingerprint(path: str) -> str:
    """What identifies the source: size and mtime of local files, the name for hub datasets."""
    if not path:  # no eval_path: not Path(""), which is the working directory
        return ""
    p = local_path(path)
    if not p.exists():
        return path
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return ";".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


CACHE_FORMAT = 2  # bump when a tokenized example's fields change (2: prompt_len)


def cache_path(cfg: DataCfg, tokenizer: PreTrainedTokenizerBase, seed: int) -> Path:
    """Keyed by the data, the tokenizer and every setting that changes the tokenized result."""
    settings = cfg.model_dump(
        exclude={"packing", "remainder", "log_sample_ids", "cache_dir", "streaming", "group_by_length"}
    )
    tok = getattr(tokenizer, "backend_tokenizer", None)
    tok_id = tok.to_str() if tok is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    key = json.dumps(
        [
            CACHE_FORMAT,
            settings,
            seed,
            _fingerprint(cfg.path),
            _fingerprint(cfg.eval_path or ""),
            tok_id,
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            getattr(tokenizer, "chat_template", None),
        ],
        sort_keys=True,
        default=str,
    )
    root = Path(cfg.cache_dir) if cfg.cache_dir else builtin.cache_dir() / "tokenized"
    return root / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pkl"


def _tokenize_all(cfg: DataCfg, tokenizer: PreTrainedTokenizerBase, seed: int) -> dict:
    train = tokenize(read_samples(cfg.path, cfg.split)[: cfg.max_samples], cfg, tokenizer)
    if cfg.eval_path:
        evals = tokenize(
            read_samples(cfg.eval_path, cfg.eval_split or cfg.split, "data.eval_path"), cfg, tokenizer
        ).examples
        train_ex = train.examples
    else:
        train_ex, evals = split_eval(train.examples, cfg.eval_fraction, seed)
    return {
        "train": train_ex,
        "eval": evals,
        "stats": dict(train.stats, train_samples=len(train_ex), eval_samples=len(evals)),
    }


def tokenized(cfg: DataCfg, tokenizer: PreTrainedTokenizerBase, seed: int) -> tuple[dict, bool, Path]:
    """(tokenized data, whether it came from the cache, the cache file). The first process to take the file lock
    tokenizes and writes the cache; the others wait on the lock, not on a process-group
    barrier, so a long tokenization never trips the collective timeout."""
    from filelock import FileLock

    path = cache_path(cfg, tokenizer, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            with open(path, "rb") as f:
                return pickle.load(f), True, path
        result = _tokenize_all(cfg, tokenizer, seed)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(path)
    return result, False, path


@dataclass
class Prepared:
    train: list[dict]  # packed rows when data.packing
    eval: list[dict]  # packed rows when data.packing
    eval_samples: list[dict]  # the eval samples one by one (generation-based accuracy asks each its prompt)
    stats: dict  # counts and efficiency to report


def prepare(cfg: DataCfg, tokenizer: PreTrainedTokenizerBase, seed: int, micro_batch_size: int = 1) -> Prepared:
    """Train and eval examples (packed when asked) plus counts and efficiency to report."""
    result, hit, _ = tokenized(cfg, tokenizer, seed)
    train_ex, eval_ex = result["train"], result["eval"]
    stats = dict(result["stats"], cache="hit" if hit else "written")
    samples = eval_ex
    if cfg.packing:
        train_ex, eval_ex = (
            pack(train_ex, cfg.max_seq_len, seed),
            pack(eval_ex, cfg.max_seq_len, seed + 1) if eval_ex else [],
        )
        stats["packed_rows"] = len(train_ex)
    stats["padding_efficiency"] = round(padding_efficiency(train_ex, micro_batch_size, seed, cfg.group_by_length), 4)
    return Prepared(train_ex, eval_ex, samples, stats)


def load_data(
    cfg: DataCfg, tokenizer: PreTrainedTokenizerBase, seed: int, micro_batch_size: int = 1
) -> tuple[list[dict], list[dict], dict]:
    """(train, eval, stats) of `prepare`."""
    p = prepare(cfg, tokenizer, seed, micro_batch_size)
    return p.train, p.eval, p.stats


# ---------------------------------------------------------------- streaming


def open_stream(path: str, split: str = "train"):
    """A datasets IterableDataset over the source: rows are read as they are consumed."""
    import datasets

    p = local_path(path)
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
            return ds.to_iterable_dataset()
        if p.is_file():
            kind = {".csv": "csv", ".parquet": "parquet"}.get(p.suffix, "json")
            return datasets.load_dataset(kind, data_files=str(p), split="train", streaming=True)
        return datasets.load_dataset(path, split=split, streaming=True)
    except Exception as e:  # a missing name, a bad file, no network
        raise UserError(f"data.path: cannot stream {quote(path)}: {userio.first_line(e)}") from None


class StreamShard(torch.utils.data.IterableDataset):
    """This rank's share of a stream: of every `world` consecutive samples, rank r takes the r-th.

    Every rank yields the same count: a sample dropped by tokenization becomes a loss-free
    filler, and a last incomplete group is skipped (remainder=drop) or filled (remainder=pad).
    """

    def __init__(self, cfg: DataCfg, tokenizer: PreTrainedTokenizerBase, rank: int, world: int):
        self.cfg, self.tokenizer, self.rank, self.world = cfg, tokenizer, rank, world
        self.counts = Tokenized(examples=[])

    def set_epoch(self, epoch: int) -> None:  # a stream is read in file order every epoch
        self.epoch = epoch

    def _filler(self) -> dict:
        return {"id": -1, "input_ids": [self.tokenizer.eos_token_id], "labels": [IGNORE]}

    def __iter__(self):
        stream, fmt, group = open_stream(self.cfg.path, self.cfg.split), None, []
        for i, row in enumerate(stream):
            fmt = fmt or detect_format(row, self.cfg)
            group.append((i, row))
            if len(group) == self.world:
                yield self._mine(group, fmt)
                group = []
        if group and self.cfg.remainder == "pad":
            yield self._mine(group, fmt) if self.rank < len(group) else self._filler()

    def _mine(self, group, fmt) -> dict:
        i, row = group[self.rank]
        ex = tokenize_one(row, i, fmt, self.cfg, self.tokenizer, self.counts)
        return ex if ex is not None else self._filler()


def make_stream_loader(cfg: DataCfg, tokenizer: PreTrainedTokenizerBase, batch_size: int, rank: int, world: int):
    return torch.utils.data.DataLoader(
        StreamShard(cfg, tokenizer, rank, world), batch_size=batch_size, collate_fn=PadCollator(tokenizer.pad_token_id)
    )
