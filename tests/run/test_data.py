"""Data: prompt masking per format, disjoint rank shards, padding."""

import pytest

from launcher.config.errors import UserError
from launcher.config.recipe import load_recipe
from launcher.demo import builtin
from launcher.run import data


@pytest.fixture(scope="module")
def tok():
    return builtin.build_tokenizer()


def _cfg(**kw):
    kw.setdefault("format", "auto")
    kw.setdefault("max_seq_len", 256)
    over = [f"data.{k}={v}" for k, v in kw.items()]
    return load_recipe(None, over).data


def test_prompt_tokens_are_masked(tok):
    out = data.tokenize([{"prompt": "12+3=", "completion": "15"}], _cfg(format="auto"), tok)
    ex = out.examples[0]
    n_prompt = 1 + len("12+3=")  # BOS + one token per character
    assert ex["labels"][:n_prompt] == [data.IGNORE] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == tok.eos_token_id


def test_train_on_prompt_keeps_labels(tok):
    ex = data.tokenize([{"prompt": "1+1=", "completion": "2"}], _cfg(train_on_prompt=True), tok).examples[0]
    assert ex["labels"] == ex["input_ids"]


def test_formats(tok):
    alpaca = data.tokenize([{"instruction": "add", "input": "1+1", "output": "2"}], _cfg(), tok)
    assert alpaca.stats["format"] == "alpaca"
    chat = data.tokenize(
        [{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}], _cfg(), tok
    )
    ex = chat.examples[0]
    assert chat.stats["format"] == "chat" and sum(t != data.IGNORE for t in ex["labels"]) == 2  # "2" + EOS
    text = data.tokenize([{"text": "abc"}], _cfg(), tok).examples[0]
    assert text["labels"][1:] == text["input_ids"][1:]


def test_bad_data_is_a_clear_error(tmp_path, tok):
    with pytest.raises(UserError, match="no field 'completion'"):
        data.tokenize([{"prompt": "a"}], _cfg(format="prompt_completion"), tok)
    with pytest.raises(UserError, match="data.max_seq_len"):
        data.tokenize([{"prompt": "1" * 50, "completion": "2"}], _cfg(too_long="error", max_seq_len=16), tok)
    out = data.tokenize(
        [{"prompt": "1", "completion": "2" * 50}, {"prompt": "1", "completion": "2"}],
        _cfg(too_long="truncate", max_seq_len=16),
        tok,
    )
    assert out.truncated == 1 and len(out.examples[0]["input_ids"]) == 16
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 1}\nnot json\n')
    with pytest.raises(UserError, match="not valid JSON"):
        data.read_samples(str(bad))
    with pytest.raises(UserError, match="file not found"):
        data.read_samples(str(tmp_path / "none.jsonl"))


@pytest.mark.parametrize("n, world", [(n, w) for n in (1, 7, 64, 101) for w in (1, 2, 3, 4) if n >= w])
def test_shards_are_disjoint_and_equal(n, world):
    shards = [list(data.ShardSampler(n, r, world, seed=3)) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == (n // world) * world
    assert len({len(s) for s in shards}) == 1
    other_epoch = data.ShardSampler(n, 0, world, seed=3)
    other_epoch.set_epoch(1)
    if n > 8:
        assert list(other_epoch) != shards[0]


def test_collator_pads_and_masks(tok):
    exs = data.tokenize(
        [{"prompt": "1+1=", "completion": "2"}, {"prompt": "10+10=", "completion": "20"}], _cfg(), tok
    ).examples
    batch = data.PadCollator(tok.pad_token_id)(exs)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = len(exs[0]["input_ids"])
    assert batch["attention_mask"][0, short:].sum() == 0 and (batch["labels"][0, short:] == data.IGNORE).all()
