"""Data at scale: tokenization throughput and the host memory the data costs each rank.

    python bench/data_scale.py make --samples 100000 --out /tmp/ds        # alpaca-like JSONL, 32k BPE, tiny model
    python bench/data_scale.py ours --dir /tmp/ds --samples 100000        # `launcher preprocess`, fresh cache
    python bench/data_scale.py hf --dir /tmp/ds --samples 100000          # datasets.map(batched, num_proc=2)
    python bench/data_scale.py rss --dir /tmp/ds --samples 100000 --impl ours   # 2 ranks, cache hit
    farm-bench -n 3 --timeout 1800 -- python bench/data_scale.py ours --dir /tmp/ds --samples 100000 \\
        --vs 'python bench/data_scale.py hf --dir /tmp/ds --samples 100000'

The samples are alpaca-shaped (instruction, optional input, output) with natural, log-normal
lengths: sentences of Zipf-distributed pseudo-words, ~270 tokens and ~1.4 KB of JSON a sample.
The tokenizer is a 32k byte-level BPE trained here on the first 20k samples. Both sides read
the same file with the same tokenizer, from a fresh cache, as whole processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"  # as launcher.run.samples renders alpaca


def make(samples: int, out: Path, seed: int = 0) -> Path:
    """The JSONL (built once per size), the tokenizer and a tiny model using it (once per folder)."""
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"alpaca-{samples}.jsonl"
    if not path.exists():
        rng = np.random.default_rng(seed)
        syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "st", "er", "an", "qu"]
        lexicon = sorted({"".join(rng.choice(syllables, rng.integers(1, 5))) for _ in range(60000)})
        p = 1 / (np.arange(len(lexicon)) + 2.7)
        words = rng.choice(len(lexicon), size=2_000_000, p=p / p.sum())
        sizes = np.clip(rng.lognormal(2.4, 0.5, 120_000).astype(int), 3, 60)
        cuts = np.cumsum(sizes) % (len(words) - 60)
        sentences = [" ".join(lexicon[w] for w in words[c : c + n]).capitalize() + "." for c, n in zip(cuts, sizes)]
        pick = rng.integers(0, len(sentences), size=(samples, 64))
        n_out = np.clip(rng.lognormal(2.45, 0.7, samples).astype(int), 1, 60)
        has_input = rng.random(samples) < 0.4
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for i in range(samples):
                row = pick[i]
                f.write(
                    json.dumps(
                        {
                            "instruction": sentences[row[0]],
                            "input": sentences[row[1]] if has_input[i] else "",
                            "output": " ".join(sentences[j] for j in row[2 : 2 + n_out[i]]),
                        }
                    )
                    + "\n"
                )
        tmp.replace(path)
    if not (out / "model" / "config.json").exists():
        _tokenizer_and_model(path, out / "model")
    return path


def _tokenizer_and_model(data: Path, where: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    def texts():
        with open(data) as f:
            for _, line in zip(range(20000), f):
                row = json.loads(line)
                yield row["instruction"] + "\n" + row["input"] + "\n" + row["output"]

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=32000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts(), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.save_pretrained(where)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(where)


def recipe_args(d: Path, samples: int, cache: Path) -> list[str]:
    return [
        f"model.name={d / 'model'}",
        f"data.path={d / f'alpaca-{samples}.jsonl'}",
        "data.format=alpaca",
        "data.max_seq_len=2048",
        f"data.cache_dir={cache}",
    ]


def ours(d: Path, samples: int) -> dict:
    """`launcher preprocess` into a fresh cache: what a user runs (or what `train` does on a miss)."""
    cache = Path(tempfile.mkdtemp(prefix="ours-cache-"))
    try:
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "launcher", "preprocess", *recipe_args(d, samples, cache)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
        stats = json.loads(out.stdout.splitlines()[-1])
        return {"impl": "ours", "s": round(time.perf_counter() - start, 2), **stats, "cache_mb": _mb(cache)}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def hf(d: Path, samples: int, num_proc: int = 2) -> dict:
    """The ecosystem's way (TRL, axolotl): load_dataset("json") then a batched map over num_proc processes."""
    cache = Path(tempfile.mkdtemp(prefix="hf-cache-"))
    try:
        start = time.perf_counter()
        ds = _hf_map(d, samples, cache, num_proc)
        tokens = sum(map(len, ds["input_ids"]))
        return {"impl": "datasets.map", "s": round(time.perf_counter() - start, 2), "samples": len(ds),
                "tokens": tokens, "cache_mb": _mb(cache)}  # fmt: skip
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _hf_map(d: Path, samples: int, cache: Path, num_proc: int = 2):
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(d / "model")

    def fn(batch):
        texts = [
            PROMPT.format(instruction=i, input_block=f"### Input:\n{x}\n\n" if x else "") + o + tok.eos_token
            for i, x, o in zip(batch["instruction"], batch["input"], batch["output"])
        ]
        return tok(texts, add_special_tokens=False)

    ds = datasets.load_dataset("json", data_files=str(d / f"alpaca-{samples}.jsonl"), split="train", cache_dir=cache)
    return ds.map(fn, batched=True, num_proc=num_proc, remove_columns=ds.column_names)


def _mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1)


def smaps() -> dict:
    """This process's memory in MB: private (pages no other process maps: Private_Clean +
    Private_Dirty), anonymous (its own heap), and its proportional share of what it maps (Pss)."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        out[key] = int(value.split()[0]) / 1024
    return {"private": out["Private_Clean"] + out["Private_Dirty"], "anon": out["Anonymous"], "pss": out["Pss"]}


def rank(d: Path, samples: int, cache: Path, impl: str, r: int, packing: bool) -> dict:
    """One of two ranks: the tokenizer loaded, then what the data adds (cache hit, 16 batches read)."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT))
    tok = AutoTokenizer.from_pretrained(d / "model")
    import datasets  # noqa: F401
    import torch  # noqa: F401

    from launcher.config.recipe import load_recipe
    from launcher.run import data

    before = smaps()
    if impl == "ours":
        over = recipe_args(d, samples, cache) + [f"data.packing={str(packing).lower()}"]
        recipe = load_recipe(None, over)
        p = data.prepare(recipe.data, tok, seed=0, micro_batch_size=4)
        loader = data.make_loader(p.train, 4, r, 2, 0, tok.pad_token_id)
    else:
        ds = _hf_map(d, samples, cache)
        order = data.ShardSampler(len(ds), r, 2, 0).order()
        loader = ([torch.tensor(ds[int(i)]["input_ids"]) for i in order[k : k + 4]] for k in range(0, 64, 4))
    for _, batch in zip(range(16), loader):
        pass
    after = smaps()
    return {k: round(after[k] - before[k], 1) for k in after}


def rss(d: Path, samples: int, impl: str, packing: bool, keep: Path | None = None) -> dict:
    """Two ranks at once over a warm cache (built first, outside the measurement; `keep`: a cache
    folder to build once and reuse)."""
    cache = keep or Path(tempfile.mkdtemp(prefix=f"{impl}-rss-"))
    try:
        if impl == "ours":
            subprocess.run(
                [sys.executable, "-m", "launcher", "preprocess", *recipe_args(d, samples, cache)],
                check=True, capture_output=True, cwd=ROOT,
            )  # fmt: skip
        else:
            _hf_map(d, samples, cache)
        cmd = [sys.executable, __file__, "_rank", "--dir", str(d), "--samples", str(samples), "--impl", impl,
               "--cache", str(cache)] + (["--packing"] if packing else [])  # fmt: skip
        procs = [
            subprocess.Popen([*cmd, "--rank", str(r)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for r in range(2)
        ]
        ranks = [json.loads(p.stdout.readline()) for p in procs]  # both measured while both are alive
        for p in procs:
            p.communicate("")
        return {"impl": impl, "samples": samples, "packing": packing, "ranks": ranks}
    finally:
        if keep is None:
            shutil.rmtree(cache, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["make", "ours", "hf", "rss", "_rank"])
    ap.add_argument("--dir", "--out", dest="dir", type=Path, default=Path("/tmp/data_scale"))
    ap.add_argument("--samples", type=int, default=100000)
    ap.add_argument("--impl", choices=["ours", "hf"], default="ours")
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--rank", type=int, default=0)
    a = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_CACHE", str(a.dir / "hf-datasets"))
    if a.what == "make":
        print(make(a.samples, a.dir))
    elif a.what == "ours":
        print(json.dumps(ours(a.dir, a.samples)))
    elif a.what == "hf":
        print(json.dumps(hf(a.dir, a.samples)))
    elif a.what == "rss":
        print(json.dumps(rss(a.dir, a.samples, a.impl, a.packing, a.cache)))
    else:  # a rank: its figures, then alive (sharing its pages) until the other has measured too
        print(json.dumps(rank(a.dir, a.samples, a.cache, a.impl, a.rank, a.packing)), flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
