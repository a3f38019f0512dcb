"""Samples: read the rows of a data source, tell its format, render each as (prompt, completion).

Every problem is a one-line `UserError` naming the field (data.path or data.eval_path), the file
and, for JSON Lines, the line; a sample's own problem names its index and field.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from launcher.config import userio
from launcher.config.errors import UserError
from launcher.config.recipe import DataCfg
from launcher.config.userio import quote
from launcher.demo import builtin

if TYPE_CHECKING:  # annotations only
    from transformers import PreTrainedTokenizerBase

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def local_path(path: str) -> Path:
    """The file or directory a data path names (builtin:subtraction, builtin:arithmetic: files the package ships)."""
    return builtin.data_path(path) if path in builtin.DATA else Path(path).expanduser()


def read_samples(path: str, split: str = "train", field: str = "data.path") -> list[dict]:
    """Every row of a source as a list: fine for eval files and tests; a training set is read in
    parts through `open_source` instead."""
    src = open_source(path, split, field)
    if isinstance(src, JsonlFile):
        return _checked(src.rows(0, src.path.stat().st_size, 0, 0), path, field)  # the whole file as one range
    return src.rows(0, len(src))[1]


def open_source(path: str, split: str = "train", field: str = "data.path") -> JsonlFile | Loaded:
    """A JSON Lines file (read in byte ranges, by each worker, never whole), or the rows of a JSON
    list, CSV/Parquet file, save_to_disk directory or hub dataset (through `datasets`: an Arrow
    table, memory-mapped). Errors name `field` (data.path or data.eval_path) and the file."""
    p = local_path(path)
    if p.is_dir():
        rows = _from_datasets(path, lambda ds: ds.load_from_disk(str(p)), split, field)
    elif p.suffix in (".csv", ".parquet"):
        rows = _from_datasets(
            path, lambda ds: ds.load_dataset(p.suffix[1:], data_files=str(p), split="train"), split, field
        )
    elif p.is_file():
        if p.suffix != ".json":
            return JsonlFile(p, path, field)
        rows = _checked(_read_json(p, field), path, field)
    elif p.exists():  # a named pipe, a socket, a device: a run reads its data more than once
        raise UserError(f"{field}: {path} is not a regular file (a pipe or device); write the samples to a file")
    elif path.startswith((".", "/", "~")) or p.suffix in (".json", ".jsonl"):
        raise UserError(f"{field}: file not found: {path}")
    else:  # a hub dataset name
        rows = _from_datasets(path, lambda ds: ds.load_dataset(path, split=split), split, field)
    if not len(rows):
        raise UserError(f"{field}: {path} holds no samples")
    return Loaded(rows)


def _checked(rows: list, path: str, field: str) -> list[dict]:
    if not rows:
        raise UserError(f"{field}: {path} holds no samples")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise not_an_object(field, path, i, row)
    return rows


def not_an_object(field: str, path: str, i: int, row) -> UserError:
    return UserError(
        f"{field}: {path}: sample {i} is a JSON {type(row).__name__}; every sample must be "
        "a JSON object (one per line in .jsonl)"
    )


class Loaded:
    """Rows already loaded: a list of objects, or a `datasets` table (memory-mapped Arrow)."""

    def __init__(self, rows):
        self.data = rows

    def __len__(self) -> int:
        return len(self.data)

    def rows(self, start: int, end: int) -> tuple[int, list[dict]]:
        """(index of the first, the rows start..end)."""
        if isinstance(self.data, list):
            return start, self.data[start:end]
        cols = self.data[start:end]
        return start, [dict(zip(cols, values)) for values in zip(*cols.values())]


JSON_START = frozenset(b'{["-0123456789tfn')  # a line starting with one of these is not blank


class JsonlFile:
    """A JSON Lines file read in byte ranges that end at a newline, so several processes read
    one file at once; line numbers and sample indexes stay those of the whole file (blank lines
    are skipped and not counted as samples)."""

    def __init__(self, path: Path, name: str, field: str):
        self.path, self.name, self.field = path, name, field

    def ranges(self, chunk_bytes: int) -> list[tuple[int, int]]:
        size = self.path.stat().st_size
        out, start = [], 0
        with open(self.path, "rb") as f:
            while start < size:
                f.seek(min(start + chunk_bytes, size))
                f.readline()  # to the end of the line the cut falls in
                end = min(f.tell(), size)
                out.append((start, end))
                start = end
        return out

    def _bytes(self, start: int, end: int) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(start)
                return f.read(end - start)
        except OSError as e:  # no permission, a vanished file, an I/O error
            raise UserError(f"{self.field}: cannot read {self.path}: {e.strerror or userio.first_line(e)}") from None

    def count(self, start: int, end: int) -> tuple[int, int]:
        """(newlines, samples) in a range: the line and sample numbers the next range starts from."""
        data = self._bytes(start, end)
        samples = 0
        for line in data.split(b"\n"):
            s = line.strip()
            if s and (s[0] in JSON_START or line.decode("utf-8", "replace").strip()):
                samples += 1
        return data.count(b"\n"), samples

    def rows(self, start: int, end: int, line0: int, sample0: int, limit: int | None = None) -> list[dict]:
        """The objects in a range whose first line is number `line0` + 1 and first sample `sample0`."""
        data = self._bytes(start, end)
        text = userio.decode_utf8(data, f"{self.field}: {self.path}", line0)
        if start == 0:
            text = text.removeprefix("\ufeff")  # the BOM Windows editors write is no content
        out, where = [], f"{self.field}: {self.path}"
        # Split on newline only: str.splitlines also splits on U+2028 and friends, which JSON allows
        # inside strings, and then every later line number is off.
        for number, line in enumerate(text.split("\n"), start=line0 + 1):
            if limit is not None and len(out) >= limit:
                break
            if line.strip():
                row = userio.parse_json(line, where, number)
                if not isinstance(row, dict):
                    raise not_an_object(self.field, self.name, sample0 + len(out), row)
                out.append(row)
        return out


def _read_json(p: Path, field: str) -> list:
    """A .json file holds a list of objects (or {"data": [...]})."""
    rows = userio.read_json(p, field, expect=None)
    if isinstance(rows, dict) and isinstance(rows.get("data"), list):
        return rows["data"]
    if not isinstance(rows, list):
        raise UserError(
            f'{field}: {p} must hold a JSON list of samples (or {{"data": [...]}}), not a JSON {type(rows).__name__}'
        )
    return rows


def _from_datasets(path: str, load, split: str, field: str):
    """A `datasets` table (memory-mapped Arrow, not a list): a worker reads its own rows of it."""
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
    return ds


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
