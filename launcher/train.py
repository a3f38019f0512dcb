"""Per-process entry point: `accelerate launch -m launcher.train [RECIPE] [key=value ...] [--resume]`.

The name users, the generated accelerate configs and the sbatch scripts launch; the run itself is
`launcher.run.train`.
"""

import os

from launcher.run import hostmem

hostmem.prefer_huge_pages()  # before torch is imported: c10 reads it once
from launcher.run.train import leave, main  # noqa: E402

if __name__ == "__main__":
    status = main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        leave(status)
    raise SystemExit(status)
