"""Train a recipe in this process, then save the in-memory model's logits on fixed prompts."""

import sys

import torch

from launcher.config.recipe import load_recipe
from launcher.run.train import train

PROBE = torch.tensor([[1, 5, 6, 14, 7, 8, 17], [1, 9, 9, 14, 9, 9, 17]])  # BOS 12+34= / BOS 55+55=

if __name__ == "__main__":
    recipe = load_recipe(None, sys.argv[2:])
    summary, model = train(recipe)
    model.eval()
    with torch.no_grad():
        torch.save(model(input_ids=PROBE).logits, sys.argv[1])
