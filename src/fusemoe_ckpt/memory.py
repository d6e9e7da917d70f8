"""Handing memory freed by a finished phase back to the operating system."""

from __future__ import annotations

from functools import cache


@cache
def _malloc_trim():
    try:
        import ctypes

        function = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to ask
        return None
    function.argtypes = (ctypes.c_size_t,)
    function.restype = ctypes.c_int
    return function


def release_free_memory() -> None:
    """Ask the C allocator to return its free memory to the OS (glibc's malloc_trim; elsewhere nothing).

    Planning a frontier checkpoint frees tens of megabytes of headers and records at once; glibc keeps
    the freed heap for later use, so a phase that follows (verify importing numpy for safetensors'
    reader, say) would add to the peak instead of reusing it.
    """
    function = _malloc_trim()
    if function is not None:
        function(0)
