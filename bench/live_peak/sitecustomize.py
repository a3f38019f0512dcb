"""Peak live tensor memory of a training process, the CPU stand-in for torch.cuda.max_memory_allocated.

On CPU, resident size is mostly glibc's (what it keeps after frees depends on its mmap threshold), so
it says little about what the same run needs on a GPU. Python imports this file at start-up when its
directory is on PYTHONPATH and LIVE_PEAK_DIR is set (bench/vs_hf.py --live-memory does both, so
torchrun's and accelerate's ranks inherit it): launcher.plan.memtrack's dispatch mode sees every storage
torch creates and frees; at exit the largest live total from the first forward in training mode on
(so loading is left out, the model's weights and the data are not) goes to LIVE_PEAK_DIR/<pid>.json.
The mode slows every op: these runs are not timed.
"""

import atexit
import json
import os

if os.environ.get("LIVE_PEAK_DIR"):
    import torch

    from launcher.plan import memtrack

    _tracker = memtrack.Tracker()
    _started: list[bool] = []

    def _mark(module, args):
        if not _started and module.training and torch.is_grad_enabled():
            _tracker.rebase()  # what is alive now (weights, data) is where the count starts
            _started.append(True)

    def _write():
        if not _started:
            return
        peak = _tracker.peaks()["device"].total
        with open(os.path.join(os.environ["LIVE_PEAK_DIR"], f"{os.getpid()}.json"), "w") as f:
            json.dump({"rank": int(os.environ.get("RANK", 0)), "live_peak_gb": peak / 2**30}, f)

    def _exit(code, _exit=os._exit):  # ranks of a multi-process launcher run end with os._exit: no atexit
        _write()
        _exit(code)

    torch.nn.modules.module.register_module_forward_pre_hook(_mark)
    _tracker.__enter__()
    atexit.register(_write)
    os._exit = _exit
