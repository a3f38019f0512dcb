"""Using a run: generate with base + adapter, or merge the adapter into a dequantized 16-bit base."""

from __future__ import annotations

from pathlib import Path

import torch

from launcher.config.errors import UserError
from launcher.config.recipe import load_recipe
from launcher.config.userio import first_line, read_json
from launcher.run import console
from launcher.run.model import DTYPES, load_base_model, load_tokenizer, quiet_peft, resolve_source

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _open_run(run_dir: str):
    """A finished run's recipe and base model source; each missing or damaged piece is named."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"RUN_DIR: {run_dir} is not a directory (give a run's train.output_dir)")
    missing = [f for f in ("adapter_config.json", "recipe.yaml") if not (run / f).is_file()]
    if not any((run / f).is_file() for f in ADAPTER_WEIGHTS):
        missing.append(ADAPTER_WEIGHTS[0])
    if missing:
        raise UserError(
            f"RUN_DIR: {run_dir} is not a finished run directory (missing {', '.join(missing)}; "
            "a run still training has only checkpoints/)"
        )
    read_json(run / "adapter_config.json", "RUN_DIR")
    recipe = load_recipe(str(run / "recipe.yaml"))
    return run, recipe, resolve_source(recipe.model)


def _with_adapter(base: torch.nn.Module, run: Path):
    """peft's PeftModel over `base` from the run's adapter; a damaged adapter is a one-line error."""
    from peft import PeftModel

    try:
        with quiet_peft():
            return PeftModel.from_pretrained(base, str(run))
    except Exception as e:  # safetensors, torch.load, peft's config and shape checks each raise their own type
        raise UserError(
            f"RUN_DIR: {run}: cannot load the adapter ({first_line(e)}); was the run directory changed after training?"
        ) from None


def load_with_adapter(run_dir: str):
    """(model, tokenizer): the base quantized as in training, plus the saved adapter, via plain peft."""
    run, recipe, source = _open_run(run_dir)
    console.quiet_libraries()
    device_map = "auto" if torch.cuda.is_available() else None
    base = load_base_model(source, recipe.model, recipe.quant, device_map=device_map)
    model = _with_adapter(base, run)
    return model.eval(), load_tokenizer(str(run), recipe.model)


@torch.no_grad()
def generate(run_dir: str, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy completions of each prompt (the prompt is rendered as during training: BOS + text)."""
    model, tok = load_with_adapter(run_dir)
    context = getattr(model.config, "max_position_embeddings", None)
    out = []
    for prompt in prompts:
        ids = [tok.bos_token_id] if tok.bos_token_id is not None else []
        ids = torch.tensor([ids + tok(prompt, add_special_tokens=False)["input_ids"]], device=model.device)
        new = max_new_tokens
        if context and ids.shape[1] + new > context:  # past its context a model only repeats itself, slowly
            new = max(context - ids.shape[1], 0)
            console.say(f"note: --max-new-tokens {max_new_tokens} capped at {new} (the model's context is {context})")
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        out.append(prompt + tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    return out


def merge(run_dir: str, out_dir: str, dtype: str = "bfloat16") -> Path:
    """Dequantize the base (the exact weights the adapter trained against), merge, save 16-bit."""
    run, recipe, source = _open_run(run_dir)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"OUT_DIR: {out_dir} exists and is not an empty directory; choose a new output directory")
    console.quiet_libraries()
    base = load_base_model(source, recipe.model, recipe.quant)
    if recipe.quant.mode != "none":
        from transformers.utils import logging as hf_logging

        before = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # not its "dequantized in float32" note: --dtype says what is saved
        try:
            base = base.dequantize()  # bnb layers -> nn.Linear holding the dequantized weights
        finally:
            hf_logging.set_verbosity(before)
    base = base.to(DTYPES[dtype])
    merged = _with_adapter(base, run).merge_and_unload()
    merged.config.dtype = DTYPES[dtype]
    merged.save_pretrained(out)
    load_tokenizer(str(run), recipe.model).save_pretrained(out)
    return out
