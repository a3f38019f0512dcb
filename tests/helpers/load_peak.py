"""Load a model 4-bit through launcher.run.model.load_base_model on CPU and report memory (JSON).

Anonymous memory (RssAnon: heap, tensors) is sampled every 5 ms during the load; the
checkpoint's file-backed pages (RssFile: the mmap'd safetensors, reclaimable page cache) are
reported apart. Usage: python load_peak.py MODEL_DIR [key=value ...]
"""

import json
import sys
import threading
import time


def status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 2**20  # kB -> GB
    return out


def main() -> None:
    import torch

    from launcher.config.recipe import load_recipe
    from launcher.run.model import load_base_model, resolve_source

    # Load the built-in tiny model first so that imports and bitsandbytes' native library are
    # in memory: what follows measures the load itself.
    warm = load_recipe(None, [])
    del_me = load_base_model(resolve_source(warm.model), warm.model, warm.quant, dtype=torch.float32)
    del del_me
    recipe = load_recipe(None, [f"model.name={sys.argv[1]}", *sys.argv[2:]])
    source = resolve_source(recipe.model)
    peak = {"RssAnon": 0.0, "RssFile": 0.0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for k, v in status().items():
                peak[k] = max(peak[k], v)
            time.sleep(0.005)

    before = status()
    thread = threading.Thread(target=sample)
    thread.start()
    model = load_base_model(source, recipe.model, recipe.quant, dtype=torch.float32)
    done.set()
    thread.join()
    tensors = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**30
    print(
        json.dumps(
            {
                "anon_before_gb": before["RssAnon"],
                "anon_peak_gb": peak["RssAnon"],
                "anon_after_gb": status()["RssAnon"],
                "file_peak_gb": peak["RssFile"],
                "tensors_gb": tensors,
            }
        )
    )


if __name__ == "__main__":
    main()
