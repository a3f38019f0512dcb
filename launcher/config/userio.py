"""Reading what the user hands us: recipes, overrides, data files, config.json, run directories, results.

Every decoding or shape problem becomes a one-line `UserError` naming the file, the line where
there is one, and the field. YAML is read as YAML 1.2 (ruamel.yaml): `4:00:00` stays a string
(YAML 1.1 reads it as the base-60 integer 14400, and a job would ask Slurm for 10 days), `yes`
stays a string, duplicate keys and aliases are refused (an alias bomb expands to gigabytes
before anyone could look at it). What an error quotes of the input is capped (`quote`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher.config.errors import UserError

QUOTE_MAX = 80  # characters of user input an error message quotes
YAML_MAX_BYTES = 1 << 20  # a recipe is a few KB; a megabyte of YAML is a mistake


def quote(value: Any, limit: int = QUOTE_MAX) -> str:
    """repr(value), cut to `limit` characters with the full length said."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


def first_line(err: BaseException) -> str:
    """An exception's first non-empty line (libraries' messages run to many lines), capped."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 300 else text[:280] + "..."


def read_text(path: str | Path, what: str) -> str:
    """A file's text as UTF-8; `what` is the field or flag that named the file."""
    try:
        data = Path(path).expanduser().read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what}: file not found: {path}") from None
    except OSError as e:  # a directory, no permission, ...
        raise UserError(f"{what}: cannot read {path}: {e.strerror or first_line(e)}") from None
    return decode_utf8(data, f"{what}: {path}").removeprefix("\ufeff")  # the BOM Windows editors write is no content


def decode_utf8(data: bytes, where: str, line0: int = 0) -> str:
    """Bytes of a file as text; an error names `where` and the line (the first counted from `line0` + 1)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line0 + data.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{where} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8"
        ) from None


def parse_json(text: str, where: str, first_line_no: int = 1) -> Any:
    """JSON text to values; an error names `where` and the line (counted from `first_line_no`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = first_line_no + e.lineno - 1
        raise UserError(f"{where} line {line}: not valid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise UserError(f"{where} line {first_line_no}: JSON nested too deeply") from None


def read_json(path: str | Path, what: str, expect: type | None = dict) -> Any:
    """A JSON file, which must hold an object (or `expect`)."""
    value = parse_json(read_text(path, what), f"{what}: {path}")
    if expect is not None and not isinstance(value, expect):
        kind = "a JSON object" if expect is dict else f"a JSON {expect.__name__}"
        raise UserError(f"{what}: {path} must hold {kind}, not a JSON {type(value).__name__}")
    return value


def _yaml():
    from ruamel.yaml import YAML

    y = YAML(typ="safe", pure=True)  # YAML 1.2 core schema; duplicate keys raise
    return y


def load_yaml(text: str, where: str) -> Any:
    """YAML 1.2 text to plain Python values; refuses aliases (before they expand) and duplicate keys."""
    from ruamel.yaml.events import AliasEvent

    if len(text.encode("utf-8", "surrogatepass")) > YAML_MAX_BYTES:
        raise UserError(f"{where}: {len(text)} characters is far too large for a recipe")
    y = _yaml()
    try:
        for event in y.parse(text):
            if isinstance(event, AliasEvent):
                line = event.start_mark.line + 1 if event.start_mark else "?"
                raise UserError(
                    f"{where} line {line}: YAML aliases (*{event.anchor}) are not accepted; write the value out"
                )
        return y.load(text)
    except UserError:
        raise
    except Exception as e:  # ruamel's errors (and its duplicate-key "warning" class) share no base we can name
        raise UserError(f"{where}{_yaml_where(e)}: not valid YAML ({_yaml_problem(e)})") from None


def _yaml_where(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f" line {mark.line + 1}" if mark is not None else ""


def _yaml_problem(e: Exception) -> str:
    problem = getattr(e, "problem", None)
    if type(e).__name__ == "DuplicateKeyError":
        import re

        key = re.search(r'duplicate key "(.*?)" with value', problem or "")
        return f"duplicate key {quote(key.group(1) if key else '?')}; each key may appear once"
    return problem or first_line(e)


def dump_yaml(value: Any) -> str:
    """Plain values as block YAML 1.2, keys in order (read back by `load_yaml` to the same values)."""
    import io

    y = _yaml()
    y.default_flow_style = False
    y.sort_base_mapping_type_on_output = False
    buf = io.StringIO()
    y.dump(value, buf)
    return buf.getvalue()
