"""glibc's malloc tuned for a CPU training step, which frees and reallocates the same large blocks."""

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed large blocks for reuse instead of returning them to the OS.

    PyTorch's CPU tensors come from malloc, which maps each block over its threshold (at most
    32 MB) afresh and unmaps it when freed: every training step of the `cpu` preset then faults its
    (tokens, vocabulary) logits, their gradients and the activations in again, zero-filled page by
    page: 63k page faults (250 MB) a step, against under 2k with the thresholds raised (measured
    with getrusage). A no-op off Linux or without glibc.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
