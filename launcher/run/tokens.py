"""Tokenized data: samples tokenized in blocks by several processes, into an Arrow cache that
every rank memory-maps, so a node holds one copy in the page cache whatever its rank count.

A JSON Lines file is cut into byte ranges that each worker reads itself (the main process
never holds the rows); other sources are read through `datasets` and each worker takes its
rows of the table. A block's prompts and completions are tokenized in one batched call each.
Only token ids and the prompt length are stored: labels are the ids with the prompt masked,
derived when a row is read. The cache is Arrow and JSON only, never a pickle: whoever can
write a shared cache directory cannot make a run execute code.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from launcher.config import userio
from launcher.config.errors import UserError
from launcher.config.recipe import DataCfg
from launcher.demo import builtin
from launcher.run import samples
from launcher.run.samples import JsonlFile, Loaded

if TYPE_CHECKING:  # annotations only
    from transformers import PreTrainedTokenizerBase

IGNORE = -100
CACHE_FORMAT = 3  # bump when the cache's layout changes (3: Arrow columns, was a pickle)
CHUNK_BYTES = 4 << 20  # of JSON Lines per task: ~3k alpaca samples, a few seconds of tokenizing
ROWS_PER_TASK = 4096  # of an already loaded source per task
PARALLEL_BYTES = 8 << 20  # smaller sources are tokenized in the process itself (no pool start-up)


@dataclass
class Counts:
    dropped_empty: int = 0
    dropped_long: int = 0
    truncated: int = 0

    def add(self, other: Counts) -> None:
        self.dropped_empty += other.dropped_empty
        self.dropped_long += other.dropped_long
        self.truncated += other.truncated


@dataclass
class Block:
    """One task's samples as columns: source index, token ids (flat, with offsets), prompt length."""

    ids: np.ndarray
    offsets: np.ndarray
    tokens: np.ndarray
    prompt_len: np.ndarray
    counts: Counts = field(default_factory=Counts)

    def __len__(self) -> int:
        return len(self.ids)

    def example(self, k: int, train_on_prompt: bool) -> dict:
        ids = self.tokens[self.offsets[k] : self.offsets[k + 1]].tolist()
        return example(int(self.ids[k]), ids, int(self.prompt_len[k]), train_on_prompt)


def example(sample_id: int, ids: list[int], prompt_len: int, train_on_prompt: bool) -> dict:
    """A sample as the loader reads it; labels are -100 on the prompt unless train_on_prompt.
    prompt_len: where the answer starts, for generation-based accuracy (launcher.run.answers)."""
    labels = list(ids) if train_on_prompt else [IGNORE] * min(prompt_len, len(ids)) + ids[prompt_len:]
    return {"id": sample_id, "input_ids": ids, "labels": labels, "prompt_len": prompt_len}


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens. A fast tokenizer's backend is called directly,
    without the character offsets nobody here reads: 15% less time than `tokenizer(texts)`
    (1.16 vs 1.36 s for 3,024 alpaca samples, 32k BPE), the same ids (tested)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if hasattr(backend, "encode_batch_fast") and not getattr(tokenizer, "split_special_tokens", False):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    out = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
    return out["input_ids"]


def tokenize_rows(rows: list[dict], first: int, fmt: str, cfg: DataCfg, tokenizer: PreTrainedTokenizerBase) -> Block:
    """Rows `first`, `first`+1, ... tokenized in two batched calls (prompts, completions). Empty
    completions and too-long samples are dropped or truncated and counted; errors are raised in
    sample order, as one sample at a time would meet them."""
    pairs, error = [], None
    for k, row in enumerate(rows):
        try:
            pairs.append(samples.render(row, fmt, cfg, tokenizer, first + k))
        except UserError as e:  # raised after the samples before it (one of them may fail first)
            error = e
            break
    keep = [k for k, (_, completion) in enumerate(pairs) if completion.strip()]
    counts = Counts(dropped_empty=len(pairs) - len(keep))
    prompts = _encode(tokenizer, [pairs[k][0] for k in keep])
    completions = _encode(tokenizer, [pairs[k][1] for k in keep])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos, limit = [tokenizer.eos_token_id], cfg.max_seq_len
    ids, seqs, plens = [], [], []
    for k, p, c in zip(keep, prompts, completions):
        n_prompt, n = len(bos) + len(p), len(bos) + len(p) + len(c) + 1
        if n > limit:
            if cfg.too_long == "error":
                raise UserError(
                    f"data: sample {first + k} has {n} tokens > data.max_seq_len={limit} "
                    "(raise it, or set data.too_long=truncate/drop)"
                )
            if cfg.too_long == "drop" or n_prompt >= limit:
                counts.dropped_long += 1
                continue
            counts.truncated += 1
        ids.append(first + k)
        seqs.append((bos + p + c + eos)[:limit])
        plens.append(n_prompt)
    if error is not None:
        raise error
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(offsets[-1]))
    return Block(np.asarray(ids, dtype=np.int64), offsets, tokens, np.asarray(plens, dtype=np.int32), counts)


def no_usable_samples(path: str, empty: int, too_long: int) -> UserError:
    return UserError(f"data: no usable samples in {path} (empty: {empty}, too long: {too_long})")


# ---------------------------------------------------------------- building, in parallel

_JOB: tuple = ()  # (source, format, data section, tokenizer) in a worker, inherited at fork


def _start_worker(job: tuple) -> None:
    global _JOB
    _JOB = job


def _count(task: tuple[int, int]) -> tuple[int, int]:
    return _JOB[0].count(*task)


def _tokenize_task(task: tuple) -> Block:
    source, fmt, cfg, tokenizer = _JOB
    if isinstance(source, JsonlFile):
        start, end, line0, sample0, limit = task
        return tokenize_rows(source.rows(start, end, line0, sample0, limit), sample0, fmt, cfg, tokenizer)
    first, rows = source.rows(*task)
    return tokenize_rows(rows, first, fmt, cfg, tokenizer)


class _Workers:
    """`map` over tasks, in order: in this process, or over forked workers that inherit the job
    (the tokenizer, the source) instead of receiving it. A worker that dies (killed, out of memory)
    ends the build with one line instead of hanging it."""

    def __init__(self, job: tuple, processes: int):
        self.job, self.processes, self.pool = job, processes, None

    def __enter__(self):
        _start_worker(self.job)
        if self.processes > 1:
            import multiprocessing

            # Forked workers must not inherit a tokenizer that has run threads (tokenizers would
            # warn and turn them off); each worker is one core anyway.
            was = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = was or "false"
            self.pool = ProcessPoolExecutor(
                self.processes,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_start_worker,
                initargs=(self.job,),
            )
            try:
                self.pool.submit(int).result()  # forks every worker now, while the variable is set
            finally:
                if was is None:
                    del os.environ["TOKENIZERS_PARALLELISM"]
        return self

    def map(self, fn, tasks):
        if self.pool is None:
            yield from map(fn, tasks)
            return
        try:
            yield from self.pool.map(fn, tasks)
        except BrokenProcessPool:
            raise UserError(
                f"data: a tokenizing process died (killed, or out of memory); lower data.num_proc "
                f"(was {self.processes}) or free memory, then run again"
            ) from None

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        _start_worker(())


def processes(cfg: DataCfg) -> int:
    """data.num_proc, or the cores this process may run on (what Slurm or taskset gave it)."""
    return cfg.num_proc or len(os.sched_getaffinity(0))


def _tasks(source: JsonlFile | Loaded, limit: int | None, workers: _Workers) -> tuple[list[tuple], int]:
    """The tasks that read the first `limit` samples (all without a limit), and their count."""
    if isinstance(source, Loaded):
        n = len(source) if limit is None else min(limit, len(source))
        return [(s, min(s + ROWS_PER_TASK, n)) for s in range(0, n, ROWS_PER_TASK)], n
    tasks, line0, sample0 = [], 0, 0
    ranges = source.ranges(CHUNK_BYTES)
    for (start, end), (lines, n) in zip(ranges, workers.map(_count, ranges)):
        if limit is not None and sample0 >= limit:
            break
        if n:
            tasks.append((start, end, line0, sample0, None if limit is None else limit - sample0))
        line0, sample0 = line0 + lines, sample0 + n
    return tasks, sample0 if limit is None else min(sample0, limit)


def _first_row(source: JsonlFile | Loaded) -> dict:
    if isinstance(source, Loaded):
        return source.rows(0, 1)[1][0]
    line0 = 0
    for start, end in source.ranges(CHUNK_BYTES):
        rows = source.rows(start, end, line0, 0, limit=1)
        if rows:
            return rows[0]
        line0 += source.count(start, end)[0]
    raise UserError(f"{source.field}: {source.name} holds no samples")


def _schema():
    import pyarrow as pa

    return pa.schema([("id", pa.int64()), ("input_ids", pa.large_list(pa.int32())), ("prompt_len", pa.int32())])


def build(path: str, split: str, what: str, cfg: DataCfg, tokenizer, limit: int | None, out: Path) -> dict:
    """Tokenize a source into the Arrow file `out`; returns the counts and format. Blocks are written
    as they arrive, in order, so the main process holds one block at a time."""
    import pyarrow as pa

    source = samples.open_source(path, split, what)
    fmt = samples.detect_format(_first_row(source), cfg)
    size = source.path.stat().st_size if isinstance(source, JsonlFile) else len(source) * 1000
    n_proc = processes(cfg) if size > PARALLEL_BYTES else 1
    counts, kept, n_tokens = Counts(), 0, 0
    with _Workers((source, fmt, cfg, tokenizer), n_proc) as workers, pa.OSFile(str(out), "wb") as f:
        tasks, read = _tasks(source, limit, workers)
        if not read:
            raise UserError(f"{what}: {path} holds no samples")
        with pa.ipc.new_stream(f, _schema()) as writer:
            for block in workers.map(_tokenize_task, tasks):
                counts.add(block.counts)
                kept += len(block)
                n_tokens += len(block.tokens)
                if len(block):
                    writer.write_batch(_batch(block))
    return {
        "format": fmt,
        "samples": kept,
        "tokens": n_tokens,
        "read": read,
        "dropped_empty": counts.dropped_empty,
        "dropped_too_long": counts.dropped_long,
        "truncated": counts.truncated,
        "processes": n_proc,
    }


def _batch(block: Block):
    import pyarrow as pa

    tokens = pa.LargeListArray.from_arrays(pa.array(block.offsets), pa.array(block.tokens))
    return pa.record_batch([pa.array(block.ids), tokens, pa.array(block.prompt_len)], schema=_schema())


class TokenStore:
    """Tokenized samples in an Arrow file, shared by every rank of a node through the page cache.

    At open the small columns (id, offsets, prompt length) are copied out, 12 bytes a sample, and
    the map is closed; a row's token ids are then read with pread when a batch asks for them. Not
    through a map: a 6.x kernel maps the page cache's large folios whole (up to 2 MB a fault,
    MADV_RANDOM or not), so reading 64 random rows put 47 MB of the file into the rank's RSS, and a
    packed 1M-sample run's first 16 batches 430 MB, counted private to whichever rank touched them
    first. Read, a row costs the rank the row. Private memory: 16 bytes a sample (with lengths)."""

    def __init__(self, path: Path, train_on_prompt: bool):
        self.path, self.train_on_prompt = path, train_on_prompt
        self._fd = os.open(path, os.O_RDONLY)
        self._blocks = self._index(path)
        sizes = [len(b[0]) for b in self._blocks]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        diffs = [np.diff(b[1]) for b in self._blocks]
        self.lengths = np.concatenate(diffs).astype(np.int32) if diffs else np.zeros(0, np.int32)

    @staticmethod
    def _index(path: Path) -> list[tuple]:
        """Per block: ids, offsets (from the block's first token), where its tokens start in the
        file, prompt lengths; copied out of a map that is closed before returning."""
        import pyarrow as pa

        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        blocks = []
        whole = pa.py_buffer(mapped)
        reader = pa.ipc.open_stream(whole)
        got = tuple((f.name, str(f.type)) for f in reader.schema)
        if got != tuple((f.name, str(f.type)) for f in _schema()):
            raise ValueError(f"columns {got}")
        for batch in reader:
            tokens = batch.column(1)
            values, offsets = tokens.values, tokens.offsets.to_numpy()
            at = values.buffers()[1].address - whole.address + 4 * (values.offset + int(offsets[0]))
            if not 0 <= at <= len(mapped) - 4 * int(offsets[-1] - offsets[0]):
                raise ValueError("token ids outside the file")
            ids = batch.column(0).to_numpy().astype(np.int32)  # copies, 4 bytes each
            rel = (offsets - offsets[0]).astype(np.int32)  # a block holds far fewer than 2**31 tokens
            blocks.append((ids, rel, at, batch.column(2).to_numpy().copy()))
            del batch, tokens, values, offsets
        del reader, whole
        mapped.close()  # every view of it is gone: the copies above are all that stays
        return blocks

    def __del__(self, _close=os.close):  # os.close bound now: at interpreter exit `os` may be gone
        fd = getattr(self, "_fd", None)
        if fd is not None:
            _close(fd)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        b = int(np.searchsorted(self._starts, i, side="right")) - 1
        ids, offsets, at, plen = self._blocks[b]
        k = i - int(self._starts[b])
        lo, hi = int(offsets[k]), int(offsets[k + 1])
        raw = os.pread(self._fd, 4 * (hi - lo), at + 4 * lo)
        if len(raw) != 4 * (hi - lo):
            raise UserError(f"data.cache_dir: {self.path} was cut short while this run read it; run again")
        tokens = np.frombuffer(raw, dtype=np.int32).tolist()
        return example(int(ids[k]), tokens, int(plen[k]), self.train_on_prompt)


# ---------------------------------------------------------------- the cache


def _fingerprint(path: str) -> str:
    """What identifies the source: size and mtime of local files, the name for hub datasets."""
    if not path:  # no eval_path: not Path(""), which is the working directory
        return ""
    p = samples.local_path(path)
    if not p.exists():
        return path
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return ";".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


NOT_IN_KEY = {"packing", "remainder", "log_sample_ids", "cache_dir", "streaming", "group_by_length", "num_proc"}


def cache_path(cfg: DataCfg, tokenizer: PreTrainedTokenizerBase, seed: int) -> Path:
    """A directory keyed by the data, the tokenizer and every setting that changes the tokenized result."""
    settings = cfg.model_dump(exclude=NOT_IN_KEY)
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
    return root / hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass
class Cached:
    train: TokenStore
    eval: TokenStore | None  # from data.eval_path; otherwise the eval share is split from train
    stats: dict
    state: str  # hit, written, or rebuilt (why)


def _open(path: Path, cfg: DataCfg) -> Cached:
    meta = userio.read_json(path / "meta.json", "data.cache_dir")
    if meta.get("cache_format") != CACHE_FORMAT:
        raise ValueError(f"cache format {meta.get('cache_format')!r}")
    train = TokenStore(path / "train.arrow", cfg.train_on_prompt)
    evals = TokenStore(path / "eval.arrow", cfg.train_on_prompt) if cfg.eval_path else None
    if len(train) != meta["stats"]["samples"] or (evals is not None and len(evals) != meta["eval_samples"]):
        raise ValueError("row counts differ from meta.json")
    return Cached(train, evals, meta["stats"], "hit")


def _write(path: Path, cfg: DataCfg, tokenizer) -> None:
    """Build into a private directory, then rename it into place: a reader sees all of it or none."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        stats = build(cfg.path, cfg.split, "data.path", cfg, tokenizer, cfg.max_samples, tmp / "train.arrow")
        if not stats["samples"]:
            raise no_usable_samples(cfg.path, stats["dropped_empty"], stats["dropped_too_long"])
        meta = {"cache_format": CACHE_FORMAT, "stats": stats}
        if cfg.eval_path:
            split = cfg.eval_split or cfg.split
            ev = build(cfg.eval_path, split, "data.eval_path", cfg, tokenizer, None, tmp / "eval.arrow")
            meta["eval_samples"] = ev["samples"]
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(path, ignore_errors=True)  # a damaged cache being replaced
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tokenized(cfg: DataCfg, tokenizer: PreTrainedTokenizerBase, seed: int) -> tuple[Cached, Path]:
    """The tokenized data and its cache directory. The first process to take the file lock
    tokenizes and writes the cache; the others wait on the lock, not on a process-group
    barrier, so a long tokenization never trips the collective timeout."""
    from filelock import FileLock

    path = cache_path(cfg, tokenizer, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        state = "written"
        if path.exists():
            try:
                return _open(path, cfg), path
            except (OSError, ValueError, KeyError, TypeError, UserError) as e:  # pyarrow raises OSError/ValueError
                state = f"rebuilt ({path} was damaged: {userio.first_line(e)})"
        _write(path, cfg, tokenizer)
        cached = _open(path, cfg)
        cached.state = state
        return cached, path
