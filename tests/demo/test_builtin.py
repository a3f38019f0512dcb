"""The built-in models: building one leaves the caller's random stream where it was."""

import torch

from launcher.demo import builtin


def test_building_the_tiny_model_leaves_the_callers_random_stream_alone(tmp_path):
    """A run seeds, then builds builtin:tiny-llama on a cold cache: its LoRA init and dropout must draw
    what a warm-cache run draws (a reseed here once made the two runs' adapters differ by 0.3)."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    builtin.write_random_llama(tmp_path / "model", **builtin.TINY_CONFIG)
    assert torch.equal(torch.rand(4), expected)
    assert (tmp_path / "model" / "model.safetensors").exists()
