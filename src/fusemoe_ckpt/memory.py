"""Handing memory freed by a finished phase back to the operating system."""

from __future__ import annotations

from .libc import libc_function


def release_free_memory() -> None:
    """Ask the C allocator to return its free memory to the OS (glibc's malloc_trim; elsewhere nothing).

    Planning a frontier checkpoint frees tens of megabytes of headers and records at once; glibc keeps
    the freed heap for later use, so a phase that follows (verify importing numpy for safetensors'
    reader, say) would add to the peak instead of reusing it.
    """
    function = libc_function("malloc_trim", "c_size_t")
    if function is not None:  # not glibc: nothing to ask
        function(0)
