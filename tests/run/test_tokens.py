"""Data at scale: a JSON Lines file tokenized in byte ranges by forked workers gives exactly what
one process reading the whole file gives (rows, errors, limits); packing on the length column
equals the list-based packing it replaced; the Arrow cache is shared and cannot run code; a
worker killed mid-build is one line; a stream resumes at its row."""

import bisect
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.config.errors import UserError
from launcher.config.recipe import load_recipe
from launcher.demo import builtin
from launcher.run import data, tokens


@pytest.fixture(scope="module")
def tok():
    return builtin.build_tokenizer()


def _cfg(tmp_path, path, *over):
    return load_recipe(None, [f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}", *over]).data


def _rows(n, seed=0):
    g = np.random.default_rng(seed)
    return [{"prompt": f"{a}-{b}=", "completion": str(a - b)} for a, b in g.integers(10, 99, size=(n, 2))]


@pytest.fixture
def small_chunks(monkeypatch):
    """Ranges of ~300 bytes (a dozen samples) and a pool of 2 workers even for a small file."""
    monkeypatch.setattr(tokens, "CHUNK_BYTES", 300)
    monkeypatch.setattr(tokens, "ROWS_PER_TASK", 7)
    monkeypatch.setattr(tokens, "PARALLEL_BYTES", 0)


def _write_jsonl(path: Path, rows, blank_every=0, bom=False):
    lines = [json.dumps(r) for r in rows]
    if blank_every:
        lines = [x for i, line in enumerate(lines) for x in ([line, "  "] if i % blank_every == 0 else [line])]
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cached(cfg, tok):
    cached, _ = tokens.tokenized(cfg, tok, seed=0)
    return [cached.train[i] for i in range(len(cached.train))], cached.stats


@pytest.mark.parametrize("limit", [None, 37])
def test_parallel_ranges_equal_one_process(tmp_path, tok, small_chunks, limit):
    """Blank lines, a BOM and a sample limit that ends inside a range: the same samples, ids and
    counts as tokenizing the whole file's rows in one call."""
    rows = _rows(120) + [{"prompt": "1-1=", "completion": ""}]  # one empty completion, dropped and counted
    path = _write_jsonl(tmp_path / "d.jsonl", rows, blank_every=5, bom=True)
    over = [f"data.max_samples={limit}"] if limit else []
    cfg = _cfg(tmp_path, path, *over)
    got, stats = _cached(cfg, tok)
    want = data.tokenize(data.read_samples(str(path))[:limit], cfg, tok)
    assert got == want.examples
    assert stats["processes"] == len(os.sched_getaffinity(0)) and stats["read"] == (limit or 121)
    assert stats["dropped_empty"] == (0 if limit else 1)


def _error(fn) -> str:
    with pytest.raises(UserError) as e:
        fn()
    return str(e.value)


@pytest.mark.parametrize(
    "bad, over",
    [
        ("{not json", []),
        ("[1, 2]", []),
        ('{"prompt": "x"}', []),
        ('{"prompt": "x", "completion": ["a"]}', []),
        ('{"prompt": "' + "7" * 300 + '", "completion": "1"}', ["data.too_long=error", "data.max_seq_len=64"]),
    ],
)
def test_errors_name_the_same_line_and_sample(tmp_path, tok, small_chunks, bad, over):
    """A bad sample deep in a later range is named by the line and sample index of the whole file."""
    lines = [json.dumps(r) for r in _rows(90)]
    lines.insert(70, bad)
    lines.insert(20, "")
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = _cfg(tmp_path, path, "data.format=prompt_completion", *over)
    parallel = _error(lambda: tokens.tokenized(cfg, tok, seed=0))
    whole = _error(lambda: data.tokenize(data.read_samples(str(path)), cfg, tok))
    assert parallel == whole
    assert ("line 72" in parallel) or ("sample 70" in parallel), parallel
    assert not list((tmp_path / "cache").glob("*/")), "a failed build leaves no cache behind"


def test_not_utf8_names_the_line(tmp_path, tok, small_chunks):
    path = tmp_path / "d.jsonl"
    body = "\n".join(json.dumps(r) for r in _rows(60)).encode()
    cut = body.index(b"\n", 1500)
    path.write_bytes(body[:cut] + b'\n{"prompt": "\xff", "completion": "1"}' + body[cut:])
    line = body[:cut].count(b"\n") + 2
    msg = _error(lambda: tokens.tokenized(_cfg(tmp_path, path), tok, seed=0))
    assert f"line {line}: not UTF-8" in msg


@pytest.mark.parametrize("kind", ["json", "parquet"])
def test_loaded_sources_in_parallel(tmp_path, tok, small_chunks, kind):
    """A JSON list and a Parquet file (through datasets) are split over the workers by rows."""
    rows = _rows(50)
    path = tmp_path / f"d.{kind}"
    if kind == "json":
        path.write_text(json.dumps(rows))
    else:
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    cfg = _cfg(tmp_path, path)
    got, _ = _cached(cfg, tok)
    assert got == data.tokenize(rows, cfg, tok).examples


def test_backend_ids_equal_the_tokenizer_call(tok):
    texts = ["12-7=", "", "a b  c\n", "99-99=0"]
    assert tokens._encode(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- packing on columns


def _old_pack(lengths, max_len, seed):
    """The list-based best-fit packing this replaced (rows of sample indexes)."""
    g = torch.Generator().manual_seed(seed)
    packs, room = [], []
    for i in torch.randperm(len(lengths), generator=g).tolist():
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, row = room.pop(k)
        else:
            free, row = max_len, len(packs)
            packs.append([])
        if free - n > 0:
            bisect.insort(room, (free - n, row))
        packs[row].append(i)
    return packs


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 64), min_size=1, max_size=300),
    max_len=st.sampled_from([64, 100, 128]),
    seed=st.integers(0, 10),
)
def test_packing_equals_the_list_based_packing(lengths, max_len, seed):
    members, starts = data.pack_rows(np.array(lengths), max_len, seed)
    rows = [members[starts[r] : starts[r + 1]].tolist() for r in range(len(starts) - 1)]
    assert rows == _old_pack(lengths, max_len, seed)


def test_packed_view_reads_rows_like_the_list(tok):
    cfg = load_recipe(None, ["data.eval_fraction=0", "data.path=builtin:arithmetic"]).data
    examples = data.tokenize(data.read_samples(cfg.path)[:200], cfg, tok).examples
    view = data.Packed(examples, 64, seed=3)
    assert list(view.lengths) == [len(r["input_ids"]) for r in view]
    assert sorted(i for r in view for i in r["id"]) == list(range(200))


# ---------------------------------------------------------------- the shared cache


class _Payload:
    """Unpickling it runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_a_shared_cache_cannot_run_code(tmp_path, tok):
    """Whoever can write data.cache_dir plants pickles where a cache is read: the old launcher's
    file name, the Arrow file itself, and an Arrow extension type whose metadata is a pickle
    (pyarrow's PyExtensionType). Nothing runs; a damaged cache is rebuilt and said so."""
    import pyarrow as pa

    marker = tmp_path / "marker"
    payload = pickle.dumps(_Payload(marker))
    cfg = _cfg(tmp_path, "builtin:subtraction", "data.max_samples=50")
    key = tokens.cache_path(cfg, tok, seed=0)
    key.parent.mkdir(parents=True)
    key.with_suffix(".pkl").write_bytes(payload)  # where a pickle cache was read
    assert data.prepare(cfg, tok, seed=0).stats["cache"] == "written"
    (key / "train.arrow").write_bytes(payload)
    assert data.prepare(cfg, tok, seed=0).stats["cache"].startswith("rebuilt")
    ext = {b"ARROW:extension:name": b"arrow.py_extension_type", b"ARROW:extension:metadata": payload}
    with pa.OSFile(str(key / "train.arrow")) as f:  # into memory: the file is rewritten below
        table = pa.ipc.open_stream(f).read_all()
    schema = pa.schema([f.with_metadata(ext) if f.name == "input_ids" else f for f in table.schema])
    with pa.OSFile(str(key / "train.arrow"), "wb") as f, pa.ipc.new_stream(f, schema) as w:
        w.write_table(table.cast(schema))
    p = data.prepare(cfg, tok, seed=0)
    assert len(p.train) + len(p.eval) == 50
    assert not marker.exists()
    assert {f.suffix for f in key.parent.rglob("*") if f.is_file()} <= {".arrow", ".json", ".lock", ".pkl"}


def test_a_killed_worker_is_one_line(tmp_path):
    """kill -9 of a tokenizing process mid-build: exit 2, one line naming data.num_proc, no cache."""
    rows = [{"prompt": f"{i % 97}-{i % 13}=" * 40, "completion": str(i) * 60} for i in range(60000)]
    path = _write_jsonl(tmp_path / "big.jsonl", rows)
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "preprocess", f"data.path={path}", f"data.cache_dir={cache}",
         "data.num_proc=2", "data.max_seq_len=4096"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline, victim = time.monotonic() + 120, None
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        victim = int(kids[0]) if len(kids) >= 2 else None
        time.sleep(0.05)
    assert victim is not None, "the pool never started"
    time.sleep(0.3)
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    assert err.strip().splitlines() == [
        "error: data: a tokenizing process died (killed, or out of memory); lower data.num_proc (was 2) "
        "or free memory, then run again"
    ]
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


# ---------------------------------------------------------------- streaming


def test_a_stream_resumes_at_its_row_without_tokenizing_the_past(tmp_path, tok, monkeypatch):
    rows = _rows(40)
    path = _write_jsonl(tmp_path / "s.jsonl", rows)
    over = [f"data.path={path}", "data.streaming=true", "data.eval_fraction=0", "train.max_steps=50"]
    cfg = load_recipe(None, over).data
    full = {r: [b["sample_ids"].tolist() for b in data.make_stream_loader(cfg, tok, 3, r, 2)] for r in range(2)}
    seen = []
    real = data.tokenize_one
    monkeypatch.setattr(data, "tokenize_one", lambda row, i, *a: seen.append(i) or real(row, i, *a))
    for r in range(2):
        loader = data.make_stream_loader(cfg, tok, 3, r, 2)
        rest = [b["sample_ids"].tolist() for b in data.from_batch(None, loader, 4)]
        assert rest == full[r][4:]
    assert min(seen) == 4 * 3 * 2  # 4 batches of 3 samples, each from a group of 2 rows


def test_a_cache_cut_short_under_a_run_is_one_error_not_a_crash(tmp_path, tok):
    """Rows are read with pread, not through a map: a file truncated under a reading run is an error
    naming data.cache_dir (through a memory map it was SIGBUS)."""
    cfg = _cfg(tmp_path, "builtin:subtraction", "data.max_samples=200")
    cached, path = tokens.tokenized(cfg, tok, seed=0)
    assert cached.train[199]["input_ids"]
    os.truncate(path / "train.arrow", 1000)
    with pytest.raises(UserError, match="data.cache_dir: .* was cut short while this run read it"):
        cached.train[199]
