"""Handing memory freed by a finished phase back to the operating system."""

from __future__ import annotations

from .libc import libc_function

# Planning fewer source tensors than this frees a megabyte or two at most: not worth a trim, nor the
# 2 ms that importing ctypes adds to a small checkpoint's start-up.
TRIM_FROM_TENSORS = 10_000


def release_free_memory(tensors: int | None = None) -> None:
    """Ask the C allocator to return its free memory to the OS (glibc's malloc_trim; elsewhere nothing),
    where a phase that handled `tensors` source tensors (None: an unknown number) freed enough to matter.

    Planning a frontier checkpoint frees tens of megabytes of headers and records at once; glibc keeps
    the freed heap for later use, so a phase that follows (verify importing numpy for safetensors'
    reader, say) would add to the peak instead of reusing it.
    """
    if tensors is not None and tensors < TRIM_FROM_TENSORS:
        return
    function = libc_function("malloc_trim", "c_size_t")
    if function is not None:  # not glibc: nothing to ask
        function(0)
