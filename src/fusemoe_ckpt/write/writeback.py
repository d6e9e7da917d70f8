"""Starting the write-back of a file range early: Linux's sync_file_range, through ctypes.

Python's os module has no sync_file_range. Where it cannot be called (another OS, no libc symbol),
starting write-back early is skipped: fsync still writes everything, only later.
"""

from __future__ import annotations

import os

from ..libc import libc_function

SYNC_FILE_RANGE_WRITE = 2  # start write-out of dirty pages in the range; do not wait for it


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing the dirty pages of [offset, offset + length) of `fd` to disk.

    Best effort: an error (or no sync_file_range at all) leaves the pages to fsync.
    """
    function = libc_function("sync_file_range", "c_int", "c_longlong", "c_longlong", "c_uint")
    if function is not None and os.name == "posix":
        function(fd, offset, length, SYNC_FILE_RANGE_WRITE)
