"""`launcher` command line: train, validate, fields, generate, merge.

Every command that takes a recipe defaults to the built-in demo, and takes dotted
overrides after it (`launcher train recipe.yaml train.lr=1e-4 peft.r=32`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys

from launcher.errors import UserError
from launcher.recipe import describe_fields, load_recipe


def _split_recipe_args(items: list[str]) -> tuple[str | None, list[str]]:
    """`[RECIPE] [key=value ...]`: the first item is the recipe unless it is an override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="*", metavar="[RECIPE] [key=value]",
                   help="recipe YAML (default: the built-in demo) then dotted overrides; `launcher fields` lists keys")


def _free_port() -> int:
    """A port nobody listens on now, so two local runs never collide on 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_command(recipe_args: list[str], nproc: int, resume: bool) -> tuple[list[str], dict]:
    """One node, several processes: exactly what a user would run with accelerate."""
    import torch

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc), "--num_machines", "1",
           "--main_process_port", str(_free_port())]

    # --cpu with several processes silently runs one; --multi_gpu plus ACCELERATE_USE_CPU
    # gives real gloo ranks on a CPU-only machine.
    cmd += ["--multi_gpu", "-m", "launcher.train", *recipe_args] + (["--resume"] if resume else [])
    env = dict(os.environ) if torch.cuda.is_available() else dict(os.environ, ACCELERATE_USE_CPU="true")
    return cmd, env


def cmd_train(args) -> int:
    path, overrides = _split_recipe_args(args.recipe)
    recipe = load_recipe(path, overrides)  # validate before anything heavy, in this process
    if recipe.dist.nnodes > 1:
        raise UserError("dist.nnodes: multi-node runs go through `launcher submit` (Slurm)")
    in_launch = "LOCAL_RANK" in os.environ
    if recipe.dist.nproc > 1 and not in_launch:
        cmd, env = _spawn_command(args.recipe, recipe.dist.nproc, args.resume)
        print("launching:", shlex.join(cmd), flush=True)
        return subprocess.call(cmd, env=env)
    from launcher.train import train

    summary, _ = train(recipe, resume=args.resume)
    print(f"done: {summary['steps']} steps, eval_loss {summary['eval_loss']}, first eval_loss {summary.get('first_eval_loss')}")
    return 0


def cmd_validate(args) -> int:
    path, overrides = _split_recipe_args(args.recipe)
    print(load_recipe(path, overrides).to_yaml(), end="")
    return 0


def cmd_fields(args) -> int:
    print(describe_fields())
    return 0


def cmd_generate(args) -> int:
    from launcher.export import generate

    for text in generate(args.run_dir, args.prompt, args.max_new_tokens):
        print(text)
    return 0


def cmd_merge(args) -> int:
    from launcher.export import merge

    out = merge(args.run_dir, args.out_dir, args.dtype)
    print(f"merged model written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launcher", description="QLoRA fine-tuning from one recipe.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune (several processes when dist.nproc > 1)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="recipe keys:\n" + describe_fields())
    _add_recipe_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in train.output_dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="check a recipe and print it fully resolved")
    _add_recipe_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("fields", help="list every recipe key with its type, default and meaning")
    p.set_defaults(func=cmd_fields)

    p = sub.add_parser("generate", help="generate with the base model plus a run's adapter")
    p.add_argument("run_dir")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="dequantize the base, merge the adapter, save a plain transformers model")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.set_defaults(func=cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; checkpoints already written are kept", file=sys.stderr)
        return 130
