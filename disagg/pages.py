"""Result tensors that do not pay a page fault per 4 KiB.

A CPU result of 32 MiB or more is a fresh mmap every time (glibc's mmap
threshold never grows past 32 MiB), so the receive takes one minor fault per
4 KiB page: 28,672 for a 112 MiB room, which halved throughput here. On Linux
we ask for transparent huge pages on such a tensor's 2 MiB-aligned interior
(`madvise(MADV_HUGEPAGE)`, which only touches memory we own and is a hint: a
kernel with THP off ignores it). The process-wide alternative is PyTorch's
`THP_MEM_ALLOC_ENABLE=1`, which a library must not set for its host.

Smaller results come from glibc's heap and usually reuse touched memory, but
not always: memory glibc trimmed back to the kernel faults again (on the
Firecracker VM we test on, where the guest reports free pages to the host, a
first touch costs ~10 us per 4 KiB instead of ~0.5, and such a 14 MiB room
takes 40 ms instead of 10). Huge pages did not shorten those rooms there, and
with THP defrag=madvise an advised fault may compact memory synchronously, so
they stay unadvised.

Both are about new results. A caller that hands its results back
(`ctx.language.recycle`, `recycle.py`) has later rooms land in memory that is
already touched, which takes no fault at all, large or small.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

HUGE_PAGE = 2 << 20
ADVISE_MIN_BYTES = 32 << 20  # below: heap memory, mostly reused (see above)
_MADV_HUGEPAGE = 14


def _load_madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()


def empty_result(shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """`torch.empty`, with huge pages asked for when it is a large CPU tensor."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if _madvise is not None and t.device.type == "cpu" and t.nbytes >= ADVISE_MIN_BYTES:
        start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        end = (t.data_ptr() + t.nbytes) // HUGE_PAGE * HUGE_PAGE
        if end > start:
            _madvise(start, end - start, _MADV_HUGEPAGE)  # a hint: failure changes nothing
    return t
