"""Change detection for files a running node re-reads (the KMS keyring, the tokens file)."""
from __future__ import annotations

import os
from pathlib import Path


def file_stamp(path: str | Path) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size) of the file, or None when it cannot be read: a different stamp
    means the file was replaced or rewritten since."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
