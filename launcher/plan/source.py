"""Where a recipe's model comes from: a directory or hub id that `from_pretrained` understands,
and its config.json, read without loading weights.

Imports only leaf modules (builtin, archs, random_model, userio), so placement, the planner and
the model loader can all resolve a source without importing each other.
"""

from __future__ import annotations

from pathlib import Path

from launcher.config.errors import UserError
from launcher.config.recipe import ModelCfg
from launcher.config.userio import first_line, quote, read_json
from launcher.demo import builtin
from launcher.plan.archs import PRESETS


def resolve_source(model: ModelCfg) -> str:
    """A local directory or hub id that `from_pretrained` understands."""
    if model.name == builtin.TINY_LLAMA:
        return str(builtin.ensure_tiny_llama())
    if model.name == builtin.TINY_MATH:
        return str(builtin.tiny_math_path())
    if model.random_init:
        from launcher.plan import random_model  # torch: only for random-weight models

        if model.name in PRESETS:
            return str(random_model.preset_dir(model.name))
        if not (Path(model.name).expanduser() / "config.json").is_file():
            raise UserError(
                f"model.name: with model.random_init, give a preset ({', '.join(PRESETS)}) "
                f"or a directory with a config.json; {quote(model.name)} is neither"
            )
    path = Path(model.name).expanduser()
    looks_local = model.name.startswith((".", "/", "~")) or path.exists()
    if looks_local:
        if not path.is_dir():
            raise UserError(f"model.name: no such model directory: {model.name}")
        if not (path / "config.json").is_file():
            raise UserError(f"model.name: {model.name} has no config.json (not a Hugging Face model directory)")
        check_config(path / "config.json")
        return str(path.resolve())
    return model.name


def check_config(path: Path) -> dict:
    """A model directory's config.json: a JSON object naming its model_type, or a one-line error."""
    cfg = read_json(path, "model.name")
    if not isinstance(cfg.get("model_type"), str):
        raise UserError(f'model.name: {path} has no "model_type" (not a transformers config.json)')
    return cfg


def model_config(source: str, trust_remote_code: bool = False, local_only: bool = False) -> dict:
    """config.json as a dict, without loading weights (local directory, hub cache, or hub)."""
    local = Path(source) / "config.json"
    if local.is_file():
        return read_json(local, "model.name")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=local_only
        ).to_dict()
    except (OSError, ValueError) as e:
        raise UserError(f"model.name: cannot read the config of {quote(source)}: {first_line(e)}") from None
