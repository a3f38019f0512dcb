"""Data: tokenized samples (launcher.run.tokens) as views over the memory-mapped cache, packed
and sharded on their length column, batched per rank.

Each rank gets its own disjoint slice of a seeded per-epoch permutation (not accelerate's
sharding, which pads with duplicates and, under DeepSpeed on CPU, sees one process). Nothing
here copies the samples: a view holds index arrays, and rows are read when a batch asks.
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Sampler

from launcher.config import userio
from launcher.config.errors import UserError
from launcher.config.recipe import DataCfg
from launcher.config.userio import quote
from launcher.run import samples, tokens
from launcher.run.samples import detect_format, read_samples, render  # noqa: F401 (the data API)
from launcher.run.tokens import IGNORE, Counts, cache_path  # noqa: F401 (the data API)

if TYPE_CHECKING:  # annotations only
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


@dataclass
class Tokenized:
    examples: list[dict]
    dropped_empty: int
    dropped_long: int
    truncated: int
    stats: dict


def tokenize(rows: list[dict], cfg: DataCfg, tokenizer: PreTrainedTokenizerBase) -> Tokenized:
    """Rows in memory tokenized (an eval file, a test); a training set goes through the cache."""
    fmt = detect_format(rows[0], cfg)
    block = tokens.tokenize_rows(rows, 0, fmt, cfg, tokenizer)
    examples = [block.example(k, cfg.train_on_prompt) for k in range(len(block))]
    c = block.counts
    if not examples:
        raise tokens.no_usable_samples(cfg.path, c.dropped_empty, c.dropped_long)
    stats = {
        "format": fmt,
        "samples": len(examples),
        "dropped_empty": c.dropped_empty,
        "dropped_too_long": c.dropped_long,
        "truncated": c.truncated,
    }
    return Tokenized(examples, c.dropped_empty, c.dropped_long, c.truncated, stats)


def tokenize_one(row: dict, i: int, fmt: str, cfg: DataCfg, tokenizer: PreTrainedTokenizerBase, counts: Counts):
    """One sample (a stream's), or None when dropped (counted in `counts`)."""
    block = tokens.tokenize_rows([row], i, fmt, cfg, tokenizer)
    counts.add(block.counts)
    return block.example(0, cfg.train_on_prompt) if len(block) else None


# ---------------------------------------------------------------- views


def lengths_of(examples) -> np.ndarray:
    lengths = getattr(examples, "lengths", None)
    if lengths is not None:
        return lengths
    return np.fromiter((len(e["input_ids"]) for e in examples), dtype=np.int64, count=len(examples))


class Subset:
    """Rows `idx` of a store or view."""

    def __init__(self, base, idx: np.ndarray):
        self.base, self.idx = base, idx
        self.lengths = lengths_of(base)[idx]

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> dict:
        return self.base[int(self.idx[i])]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class Packed:
    """Packed rows: row r holds samples members[starts[r]:starts[r+1]] of `base`, read and joined
    when the batch asks for the row. Each sample's positions restart at 0 and its first label is
    ignored (it would otherwise be predicted from the previous sample's last token)."""

    def __init__(self, base, max_len: int, seed: int):
        self.base = base
        self.members, self.starts = pack_rows(lengths_of(base), max_len, seed)
        lengths = lengths_of(base)[self.members]
        self.lengths = np.add.reduceat(lengths, self.starts[:-1]) if len(lengths) else lengths

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, r: int) -> dict:
        row: dict = {"id": [], "input_ids": [], "labels": [], "position_ids": []}
        for i in self.members[self.starts[r] : self.starts[r + 1]].tolist():
            ex = self.base[i]
            row["id"].append(ex["id"])
            row["input_ids"] += ex["input_ids"]
            row["labels"] += [IGNORE] + ex["labels"][1:]
            row["position_ids"] += range(len(ex["input_ids"]))
        return row

    def __iter__(self):
        return (self[r] for r in range(len(self)))


def pack_rows(lengths: np.ndarray, max_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit packing in a seeded order: each sample goes to the open row it fills the most
    (a new row when none has room; of equal fits, the oldest row). Rows end ~97% full where
    filling rows in turn leaves ~82% (log-normal lengths), so an epoch takes fewer, fuller steps.

    Returns (samples in row order, where each row starts). Open rows are kept by free space
    (at most max_len sizes, each a heap of rows), so a million samples pack in seconds."""
    n = len(lengths)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    row_of = np.empty(n, dtype=np.int64)
    sizes: list[int] = []  # free sizes that have an open row, sorted
    open_rows: dict[int, list[int]] = {}
    rows = 0
    for pos, need in enumerate(lengths[order].tolist()):
        k = bisect.bisect_left(sizes, need)
        if k < len(sizes):
            free = sizes[k]
            heap = open_rows[free]
            row = heapq.heappop(heap)
            if not heap:
                del open_rows[free], sizes[k]
        else:
            free, row, rows = max_len, rows, rows + 1
        rest = free - need
        if rest > 0:
            if rest in open_rows:
                heapq.heappush(open_rows[rest], row)
            else:
                open_rows[rest] = [row]
                bisect.insort(sizes, rest)
        row_of[pos] = row
    by_row = np.argsort(row_of, kind="stable")
    starts = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of, minlength=rows), out=starts[1:])
    return order[by_row].astype(np.int32), starts


def pack(examples, max_len: int, seed: int) -> list[dict]:
    """The packed rows as a list (tests, small sets); the training set is a `Packed` view."""
    return list(Packed(examples, max_len, seed))


def split_eval(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded hold-out of `fraction` of n samples (at least one when fraction > 0): (train, eval)
    indexes, each in file order."""
    if fraction <= 0:
        return np.arange(n, dtype=np.int32), np.arange(0, dtype=np.int32)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise UserError(f"data.eval_fraction: {fraction} leaves no training samples out of {n}")
    held = np.zeros(n, dtype=bool)
    held[order[:n_eval]] = True
    return np.flatnonzero(~held).astype(np.int32), np.flatnonzero(held).astype(np.int32)  # 4 bytes a sample


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
        lengths: np.ndarray | None = None,
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

    def order(self) -> np.ndarray:
        """This rank's indexes for the epoch, as an array."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).numpy()
        else:
            order = np.arange(self.n)
        per_rank = len(self)
        fill = per_rank * self.world - len(order)  # fillers (pad mode only)
        if fill > 0:
            order = np.concatenate([order, np.full(fill, -1, dtype=order.dtype)])
        if self.lengths is None:
            mine = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        else:
            mine = self._by_length(order[: per_rank * self.world])[self.rank :: self.world]
        return mine.astype(np.int32)  # a copy: the whole permutation (8 bytes a sample) is freed

    def __iter__(self):
        order = self.order()
        for start in range(0, len(order), 8192):  # Python ints a few thousand at a time
            yield from order[start : start + 8192].tolist()

    def _by_length(self, order: np.ndarray) -> np.ndarray:
        """Sort by length within windows of 64 global batches, then shuffle the batches: similar
        lengths share a batch while the order stays seeded. Ranks take every world-th sample."""
        window = 64 * self.batch_size * self.world
        lengths = np.where(order >= 0, np.asarray(self.lengths)[np.maximum(order, 0)], 0)
        ranked = order.copy()
        for start in range(0, len(order), window):
            part = slice(start, start + window)
            ranked[part] = order[part][np.argsort(-lengths[part], kind="stable")]
        step = self.batch_size * self.world  # one global batch
        g = torch.Generator().manual_seed(self.seed + self.epoch + 1)
        batches = torch.randperm(-(-len(ranked) // step), generator=g).tolist()
        return np.concatenate([ranked[b * step : (b + 1) * step] for b in batches]) if batches else ranked


class Examples(torch.utils.data.Dataset):
    """The examples (a list or a view), where index -1 is a loss-free filler (all labels ignored, id -1)."""

    def __init__(self, examples):
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


def padding_efficiency(examples, batch_size: int, seed: int, group_by_length: bool = False) -> float:
    """Real tokens / tokens computed over one epoch's batches (rows padded to the batch's longest)."""
    lengths = np.asarray(lengths_of(examples), dtype=np.int64)
    if not len(lengths):
        return 1.0
    grouped = lengths if group_by_length else None
    sampler = ShardSampler(len(lengths), 0, 1, seed, lengths=grouped, batch_size=batch_size)
    ordered = lengths[sampler.order()]
    starts = np.arange(0, len(ordered), batch_size)
    widths = np.maximum.reduceat(ordered, starts) * np.diff(np.append(starts, len(ordered)))
    return float(ordered.sum() / max(widths.sum(), 1))


def make_loader(
    examples,
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
    lengths = lengths_of(examples) if group_by_length else None
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


@dataclass
class Prepared:
    train: object  # a view of the cache (packed rows when data.packing)
    eval: object  # a view of the cache (packed rows when data.packing)
    eval_samples: object  # the eval samples one by one (generation-based accuracy asks each its prompt)
    stats: dict  # counts and efficiency to report


def prepare(cfg: DataCfg, tokenizer: PreTrainedTokenizerBase, seed: int, micro_batch_size: int = 1) -> Prepared:
    """Train and eval views of the tokenized cache (packed when asked) plus counts and efficiency to report."""
    cached, _ = tokens.tokenized(cfg, tokenizer, seed)
    if cached.eval is not None:
        train, evals = cached.train, cached.eval
    else:
        train_idx, eval_idx = split_eval(len(cached.train), cfg.eval_fraction, seed)
        train, evals = Subset(cached.train, train_idx), Subset(cached.train, eval_idx)
    stats = dict(cached.stats, train_samples=len(train), eval_samples=len(evals), cache=cached.state)
    samples_ = evals
    if cfg.packing:
        train = Packed(train, cfg.max_seq_len, seed)
        evals = Packed(evals, cfg.max_seq_len, seed + 1) if len(evals) else evals
        stats["packed_rows"] = len(train)
    stats["padding_efficiency"] = round(padding_efficiency(train, micro_batch_size, seed, cfg.group_by_length), 4)
    _give_back_freed()
    return Prepared(train, evals, samples_, stats)


def _give_back_freed() -> None:
    """Return the permutations' and lengths' freed memory to the OS. glibc keeps freed heap blocks
    (its mmap threshold rises to 32 MB after the first large free): at 1M samples 30 MB a rank
    stayed resident after preparing; after malloc_trim, under 2 MB (bench/data_scale.py rss)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def load_data(cfg: DataCfg, tokenizer: PreTrainedTokenizerBase, seed: int, micro_batch_size: int = 1):
    """(train, eval, stats) of `prepare`."""
    p = prepare(cfg, tokenizer, seed, micro_batch_size)
    return p.train, p.eval, p.stats


def from_batch(accelerator: Accelerator, loader, batches: int):
    """The loader from batch `batches` of its epoch (a resumed run). A stream opens at the row
    those batches reached, without reading what came before through the tokenizer; a
    map-style loader skips its sampler's first indexes."""
    if not batches:
        return loader
    if isinstance(loader.dataset, StreamShard):
        loader.dataset.start_at(batches * loader.batch_size)
        return loader
    return accelerator.skip_first_batches(loader, batches)


# ---------------------------------------------------------------- streaming


def open_stream(path: str, split: str = "train"):
    """A datasets IterableDataset over the source: rows are read as they are consumed."""
    import datasets

    p = samples.local_path(path)
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
    A resumed run starts at the row its checkpointed batches reached (`start_at`): the rows
    before it are skipped by the reader, not tokenized again.
    """

    def __init__(self, cfg: DataCfg, tokenizer: PreTrainedTokenizerBase, rank: int, world: int):
        self.cfg, self.tokenizer, self.rank, self.world = cfg, tokenizer, rank, world
        self.counts = Counts()
        self.start = 0  # rows of the stream already trained on (this epoch)

    def set_epoch(self, epoch: int) -> None:  # a stream is read in file order every epoch
        self.epoch = epoch

    def start_at(self, per_rank: int) -> None:
        """Resume after `per_rank` samples of this rank: that many groups of `world` rows."""
        self.start = per_rank * self.world

    def _filler(self) -> dict:
        return {"id": -1, "input_ids": [self.tokenizer.eos_token_id], "labels": [IGNORE]}

    def __iter__(self):
        stream, fmt, group = open_stream(self.cfg.path, self.cfg.split), None, []
        start, self.start = self.start, 0  # the next epoch reads from the beginning
        if start:
            stream = stream.skip(start)
        for i, row in enumerate(stream, start=start):
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
