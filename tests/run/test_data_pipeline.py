"""Data pipeline: exact coverage across ranks (also across a mid-epoch resume), sources read
through `datasets`, the tokenization cache, and packing without cross-sample attention."""

import json

import pytest
import torch
from conftest import run_cli

from launcher.config.recipe import load_recipe
from launcher.demo import builtin
from launcher.run import data, tokens


@pytest.fixture(scope="module")
def tok():
    return builtin.build_tokenizer()


def _examples(n):
    return [
        {"id": i, "input_ids": [1] + [5 + i % 7] * (1 + i % 5), "labels": [-100] + [5 + i % 7] * (1 + i % 5)}
        for i in range(n)
    ]


def _epoch_ids(n, world, remainder, batch, epoch=0, skip=0):
    """Sample ids every rank consumes in one epoch (after skipping `skip` batches, as a resume does)."""
    from accelerate import skip_first_batches

    out = {}
    for rank in range(world):
        loader = data.make_loader(_examples(n), batch, rank, world, seed=3, pad_id=0, remainder=remainder)
        loader.sampler.set_epoch(epoch)
        it = skip_first_batches(loader, skip) if skip else loader
        out[rank] = [i for b in it for i in b["sample_ids"].tolist()]
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 7, 12, 33, 100])
def test_pad_mode_covers_every_sample_exactly_once(world, n):
    ids = _epoch_ids(n, world, "pad", batch=4)
    flat = [i for r in ids.values() for i in r]
    assert sorted(flat) == list(range(n))  # no repeats, no drops
    steps = {r: len(data.make_loader(_examples(n), 4, r, world, 3, 0, remainder="pad")) for r in range(world)}
    assert len(set(steps.values())) == 1  # every rank runs the same number of batches


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [4, 7, 33, 100])
def test_drop_mode_is_disjoint_and_even(world, n):
    ids = _epoch_ids(n, world, "drop", batch=3)
    flat = [i for r in ids.values() for i in r]
    assert len(flat) == len(set(flat)) == n - n % world
    assert len({len(r) for r in ids.values()}) == 1
    other_epoch = [i for r in _epoch_ids(n, world, "drop", batch=3, epoch=1).values() for i in r]
    assert flat != other_epoch or n % world == 0 or n < 3  # order (and the skipped ones) change per epoch


@pytest.mark.parametrize("world", [2, 3])
def test_mid_epoch_resume_continues_exactly(world):
    n, batch, done = 50, 4, 3
    full = _epoch_ids(n, world, "pad", batch)
    rest = _epoch_ids(n, world, "pad", batch, skip=done)
    for r in range(world):
        assert full[r][done * batch :] == rest[r]  # resumes where it stopped, same order


def test_order_is_deterministic_from_the_seed():
    assert _epoch_ids(40, 2, "drop", 4) == _epoch_ids(40, 2, "drop", 4)


def test_filler_batches_carry_no_loss():
    """A rank whose last batch is only filler computes loss 0 and zero gradients, not NaN."""
    from launcher.run.loop import forward_loss

    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.ones(3))

    def fake(input_ids, labels, attention_mask, use_cache, num_items_in_batch):
        logits = model.w.sum() * torch.ones(*labels.shape, 4)
        loss = (
            torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, 4), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
            )
            / num_items_in_batch
        )
        return type("Out", (), {"loss": loss})

    loader = data.make_loader(_examples(3), 1, rank=1, world=2, seed=0, pad_id=0, remainder="pad")
    batches = list(loader)
    assert batches[-1]["sample_ids"].numel() == 0  # rank 1's second batch is a filler
    batch = {k: v for k, v in batches[-1].items() if k not in ("sample_ids", "real_tokens")}
    loss, n = forward_loss(fake, batch, "cpu")
    loss.backward()
    assert n == 0 and loss.item() == 0 and model.w.grad.abs().sum() == 0


# ---------------------------------------------------------------- sources


def _rows():
    return [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(20)]


@pytest.mark.parametrize("kind", ["csv", "parquet", "disk", "jsonl"])
def test_sources_through_datasets(kind, tmp_path, tok):
    import datasets

    ds = datasets.Dataset.from_list(_rows())
    path = tmp_path / f"d.{kind}"
    if kind == "csv":
        ds.to_csv(str(path), index=False)
    elif kind == "parquet":
        ds.to_parquet(str(path))
    elif kind == "disk":
        datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    else:
        path.write_text("\n".join(json.dumps(r) for r in _rows()))
    rows = data.read_samples(str(path))
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in _rows()]


def test_missing_split_is_named(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows())}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(Exception, match="data.split: .* has splits \\['train'\\], not 'test'"):
        data.read_samples(str(tmp_path / "dd"), split="test")


# ---------------------------------------------------------------- cache


def test_second_load_does_not_tokenize(tmp_path, tok, monkeypatch):
    calls = []
    real = tokens.tokenize_rows
    monkeypatch.setattr(tokens, "tokenize_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = load_recipe(None, ["data.max_samples=200", f"data.cache_dir={tmp_path}"]).data
    a = data.load_data(cfg, tok, seed=1)
    assert calls == [1] and a[2]["cache"] == "written"
    b = data.load_data(cfg, tok, seed=1)
    assert calls == [1] and b[2]["cache"] == "hit"  # read back, not tokenized again
    assert list(a[0]) == list(b[0]) and list(a[1]) == list(b[1])
    c = data.load_data(
        load_recipe(None, ["data.max_samples=200", f"data.cache_dir={tmp_path}", "data.max_seq_len=16"]).data,
        tok,
        seed=1,
    )
    assert calls == [1, 1] and c[2]["cache"] == "written"  # a setting that changes tokens changes the key


def test_cache_key_ignores_the_working_directory(tmp_path, tok, monkeypatch):
    """Without data.eval_path the key once fingerprinted every file under the working directory
    (Path("") is "."): seconds per run from a repository with a venv, and any edit there re-tokenized."""
    monkeypatch.chdir(tmp_path)
    cfg = load_recipe(None, ["data.max_samples=200", f"data.cache_dir={tmp_path / 'cache'}"]).data
    key = data.cache_path(cfg, tok, seed=1)
    (tmp_path / "unrelated.txt").write_text("edited")
    assert data.cache_path(cfg, tok, seed=1) == key


def test_preprocess_then_train_reads_the_cache(tmp_path):
    over = ["data.max_samples=200", f"data.cache_dir={tmp_path / 'cache'}"]
    res = run_cli("preprocess", *over)
    assert res.returncode == 0 and res.stdout.startswith("tokenized and cached:"), res.stderr[-2000:]
    res = run_cli("train", *over, f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.warmup_steps=0")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "tokenized cache hit" in res.stdout + res.stderr


# ---------------------------------------------------------------- packing


def test_packed_rows_do_not_attend_across_samples(tok):
    """Logits of each sample inside a packed row equal its logits run alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(builtin.ensure_tiny_llama(), dtype=torch.float32).eval()
    cfg = load_recipe(None, ["data.max_samples=12", "data.eval_fraction=0"]).data
    examples = data.tokenize(data.read_samples(cfg.path)[:12], cfg, tok).examples
    packs = data.pack(examples, max_len=48, seed=0)
    assert len(packs) < len(examples) and any(len(p["id"]) > 1 for p in packs)
    batch = data.PadCollator(tok.pad_token_id)(packs[:3])
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        by_id = {e["id"]: e for e in examples}
        worst = 0.0
        for row, p in enumerate(packs[:3]):
            start = 0
            for sid in p["id"]:
                ids = by_id[sid]["input_ids"]
                alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
                worst = max(worst, (logits[row, start : start + len(ids)] - alone).abs().max().item())
                start += len(ids)
    assert worst < 1e-4


def test_packing_keeps_every_sample_and_masks_boundaries(tok):
    cfg = load_recipe(None, ["data.max_samples=100", "data.eval_fraction=0", "data.path=builtin:arithmetic"]).data
    examples = data.tokenize(data.read_samples(cfg.path)[:100], cfg, tok).examples
    packs = data.pack(examples, max_len=64, seed=0)
    assert sorted(i for p in packs for i in p["id"]) == [e["id"] for e in examples]
    assert all(len(p["input_ids"]) <= 64 for p in packs)
    for p in packs:
        starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0]
        assert all(p["labels"][s] == data.IGNORE for s in starts)  # never predicted from the previous sample
    assert data.padding_efficiency(packs, 8, 0) > data.padding_efficiency(examples, 8, 0)


def test_best_fit_packing_fills_rows():
    """Log-normal lengths (as real instruction data): rows end nearly full, in a seeded order."""
    import math
    import random

    rng = random.Random(0)
    lens = [int(min(460, max(40, rng.lognormvariate(math.log(112), 0.75)))) for _ in range(950)]
    examples = [{"id": i, "input_ids": [1] * n, "labels": [1] * n} for i, n in enumerate(lens)]
    packs = data.pack(examples, max_len=512, seed=0)
    assert sorted(i for p in packs for i in p["id"]) == list(range(950))
    assert all(len(p["input_ids"]) <= 512 for p in packs)
    fill = sum(lens) / (512 * len(packs))
    assert fill > 0.95, fill  # filling rows in turn (the old packer): 0.82
    assert [p["id"] for p in data.pack(examples, 512, seed=0)] == [p["id"] for p in packs]
    assert [p["id"] for p in data.pack(examples, 512, seed=1)] != [p["id"] for p in packs]


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [5, 12, 31])
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_stream_shards_cover_the_stream(world, n, remainder, tmp_path, tok):
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{i}+0=", "completion": str(i)}) for i in range(n)))
    cfg = load_recipe(
        None,
        [
            f"data.path={path}",
            f"data.remainder={remainder}",
            "data.streaming=true",
            "train.max_steps=10",
            "data.eval_fraction=0",
            "train.warmup_steps=0",
        ],
    ).data
    ids = {
        r: [i for b in data.make_stream_loader(cfg, tok, 2, r, world) for i in b["sample_ids"].tolist()]
        for r in range(world)
    }
    counts = {r: sum(len(b["input_ids"]) for b in data.make_stream_loader(cfg, tok, 2, r, world)) for r in range(world)}
    flat = [i for r in ids.values() for i in r]
    assert len(flat) == len(set(flat))
    assert sorted(flat) == list(range(n if remainder == "pad" else n - n % world))
    assert len(set(counts.values())) == 1  # same number of rows, so the same number of steps


def test_streaming_run_trains(tmp_path):
    src = tmp_path / "s.jsonl"
    rows = [{"prompt": f"{i % 50}+{i % 7}=", "completion": str(i % 50 + i % 7)} for i in range(300)]
    rows[4]["completion"] = " "  # an empty sample: dropped, counted, and its place filled
    src.write_text("\n".join(json.dumps(r) for r in rows))
    res = run_cli(
        "train",
        f"data.path={src}",
        "data.streaming=true",
        "data.eval_fraction=0",
        "train.max_steps=12",
        "train.warmup_steps=0",
        "train.micro_batch_size=16",
        f"train.output_dir={tmp_path / 'run'}",
        "data.log_sample_ids=true",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run/sample_ids/rank0.jsonl").read_text().splitlines()]
    seen = [i for r in rows[:-1] for i in r["ids"]]
    assert seen == [i for i in range(12 * 16) if i != 4]  # file order, each once; the empty one is a filler
    assert json.loads((tmp_path / "run/summary.json").read_text())["stream_rank0"]["dropped_empty"] == 1


# ---------------------------------------------------------------- length grouping and masking


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_length_grouping_keeps_exact_coverage(world, remainder):
    n = 301
    examples = _examples(n)
    ids = {}
    for r in range(world):
        loader = data.make_loader(examples, 4, r, world, seed=5, pad_id=0, remainder=remainder, group_by_length=True)
        ids[r] = [i for b in loader for i in b["sample_ids"].tolist()]
    flat = [i for v in ids.values() for i in v]
    assert len(flat) == len(set(flat)) == (n if remainder == "pad" else n - n % world)
    lens = {
        len(data.make_loader(examples, 4, r, world, 5, 0, remainder=remainder, group_by_length=True))
        for r in range(world)
    }
    assert len(lens) == 1


def test_length_grouping_pads_less(tok):
    cfg = load_recipe(None, ["data.eval_fraction=0"]).data
    examples = data.tokenize(data.read_samples(cfg.path)[:2000], cfg, tok).examples
    plain = data.padding_efficiency(examples, 32, 0)
    grouped = data.padding_efficiency(examples, 32, 0, group_by_length=True)
    assert grouped > plain


@pytest.mark.parametrize(
    "fmt,row",
    [
        ("prompt_completion", {"prompt": "12+3=", "completion": "15"}),
        ("alpaca", {"instruction": "add", "input": "1+1", "output": "2"}),
        ("alpaca", {"instruction": "say hi", "output": "hi"}),
        ("chat", {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}),
    ],
)
def test_labels_are_ignored_exactly_on_prompt_tokens(fmt, row, tok):
    cfg = load_recipe(None, [f"data.format={fmt}", "data.max_seq_len=256"]).data
    ex = data.tokenize([row], cfg, tok).examples[0]
    prompt, completion = data.render(row, fmt, cfg, tok, 0)
    n_prompt = 1 + len(tok(prompt, add_special_tokens=False)["input_ids"])  # BOS + prompt
    assert ex["labels"][:n_prompt] == [data.IGNORE] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:] and len(ex["labels"]) > n_prompt
    assert ex["input_ids"][-1] == tok.eos_token_id


def test_text_format_trains_on_everything_but_bos(tok):
    ex = data.tokenize([{"text": "abc"}], load_recipe(None, ["data.format=text"]).data, tok).examples[0]
    assert ex["labels"][0] == data.IGNORE and ex["labels"][1:] == ex["input_ids"][1:]


def test_alpaca_field_names_are_configurable(tok):
    cfg = load_recipe(
        None,
        [
            "data.format=auto",
            "data.max_seq_len=256",
            "data.instruction_field=q",
            "data.output_field=a",
            "data.input_field=ctx",
        ],
    ).data
    ex = data.tokenize([{"q": "add", "ctx": "1+1", "a": "2"}], cfg, tok)
    assert ex.stats["format"] == "alpaca"


def test_eval_split_from_the_same_dataset_dict(tmp_path, tok):
    import datasets

    rows = _rows()
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:15]), "test": datasets.Dataset.from_list(rows[15:])}
    ).save_to_disk(str(tmp_path / "dd"))
    cfg = load_recipe(
        None,
        [
            f"data.path={tmp_path / 'dd'}",
            f"data.eval_path={tmp_path / 'dd'}",
            "data.eval_split=test",
            "data.eval_fraction=0",
            f"data.cache_dir={tmp_path / 'c'}",
            "data.max_seq_len=64",
        ],
    ).data
    train_ex, eval_ex, stats = data.load_data(cfg, tok, seed=0)
    assert stats["train_samples"] == 15 and stats["eval_samples"] == 5


def test_stream_resume_skips_exactly_the_consumed_batches(tmp_path, tok):
    from accelerate import skip_first_batches

    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{i}+0=", "completion": str(i)}) for i in range(40)))
    cfg = load_recipe(
        None,
        [
            f"data.path={path}",
            "data.streaming=true",
            "train.max_steps=10",
            "data.eval_fraction=0",
            "train.warmup_steps=0",
        ],
    ).data
    for rank in (0, 1):
        full = [b["sample_ids"].tolist() for b in data.make_stream_loader(cfg, tok, 3, rank, 2)]
        rest = [b["sample_ids"].tolist() for b in skip_first_batches(data.make_stream_loader(cfg, tok, 3, rank, 2), 2)]
        assert rest == full[2:]
