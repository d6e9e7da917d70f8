"""C library functions Python's os module lacks (glibc's malloc_trim, Linux's sync_file_range and
fallocate), through ctypes: None where the C library has no such symbol (another OS or libc).

ctypes is imported at the first lookup: most commands never need it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache


@cache
def libc_function(name: str, *argtypes: str) -> Callable[..., int] | None:
    """The C library's `name`, taking arguments of the ctypes types named by `argtypes` ("c_int", say)
    and returning an int, errno kept for `ctypes.get_errno`; None where it has none."""
    try:
        import ctypes

        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = tuple(getattr(ctypes, t) for t in argtypes)
    function.restype = ctypes.c_int
    return function


def errno_of_last_call() -> int:
    """errno as the last call through `libc_function` on this thread left it."""
    import ctypes

    return ctypes.get_errno()
