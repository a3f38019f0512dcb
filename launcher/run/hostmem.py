"""Host memory: how torch's CPU allocator is set up for a training process.

Imports nothing heavy: the entry points call `prefer_huge_pages` before torch is imported,
because c10 reads its setting once (torch 2.13: at its first block of 2 MB or more).
"""

from __future__ import annotations

import os

HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"


def prefer_huge_pages() -> None:
    """Ask torch's CPU allocator to page-align blocks of 2 MB and more and advise huge pages for them.

    A CPU training step frees and reallocates thousands of 3-8 MB activations; glibc's heap
    fragments under that (100m, 2 x 512 tokens: a 1.15 GB heap around 0.3 GB in use, 0.7 GB of
    it in free holes of 0.7-8 MB that the next request does not fit). Page-aligned, the
    same run's heap peaked at 0.75 GB and its peak RSS fell from 1.86 to 1.43 GB (100m-32k:
    2.16 to 1.84 GB), at the same tokens/s. A value the user exported is kept as it is; on a
    kernel with THP off only the alignment changes. GPU memory is not affected."""
    os.environ.setdefault(HUGE_PAGES, "1")
