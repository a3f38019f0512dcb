"""Using a run: generate with base + adapter, or merge the adapter into a dequantized 16-bit base."""

from __future__ import annotations

from pathlib import Path

import torch

from launcher.errors import UserError
from launcher.model import DTYPES, load_base_model, load_tokenizer, resolve_source
from launcher.recipe import load_recipe


def _open_run(run_dir: str):
    run = Path(run_dir)
    if not (run / "adapter_config.json").is_file() or not (run / "recipe.yaml").is_file():
        raise UserError(f"{run_dir}: not a finished run directory (needs adapter_config.json and recipe.yaml)")
    recipe = load_recipe(str(run / "recipe.yaml"))
    return run, recipe, resolve_source(recipe.model)


def load_with_adapter(run_dir: str):
    """(model, tokenizer): the base quantized as in training, plus the saved adapter, via plain peft."""
    from peft import PeftModel

    run, recipe, source = _open_run(run_dir)
    device_map = "auto" if torch.cuda.is_available() else None
    base = load_base_model(source, recipe.model, recipe.quant, device_map=device_map)
    model = PeftModel.from_pretrained(base, str(run))
    return model.eval(), load_tokenizer(str(run), recipe.model)


@torch.no_grad()
def generate(run_dir: str, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy completions of each prompt (the prompt is rendered as during training: BOS + text)."""
    model, tok = load_with_adapter(run_dir)
    out = []
    for prompt in prompts:
        ids = [tok.bos_token_id] if tok.bos_token_id is not None else []
        ids = torch.tensor([ids + tok(prompt, add_special_tokens=False)["input_ids"]], device=model.device)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(prompt + tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def merge(run_dir: str, out_dir: str, dtype: str = "bfloat16") -> Path:
    """Dequantize the base (the exact weights the adapter trained against), merge, save 16-bit."""
    from peft import PeftModel

    run, recipe, source = _open_run(run_dir)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out_dir}: exists and is not empty; choose a new output directory")
    base = load_base_model(source, recipe.model, recipe.quant)
    if recipe.quant.mode != "none":
        base = base.dequantize()  # bnb layers -> nn.Linear holding the dequantized weights
    base = base.to(DTYPES[dtype])
    merged = PeftModel.from_pretrained(base, str(run)).merge_and_unload()
    merged.config.dtype = DTYPES[dtype]
    merged.save_pretrained(out)
    load_tokenizer(str(run), recipe.model).save_pretrained(out)
    return out
