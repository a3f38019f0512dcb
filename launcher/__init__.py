"""QLoRA training launcher: a recipe becomes a 4-bit LoRA fine-tune, locally or on Slurm."""

__version__ = "0.1.0"
