"""One broker per state file: the ``<file>.lock`` beside a file the broker keeps across
restarts (``nonce_file``, ``revocation_file``). Two brokers appending to one file would
interleave records; the second is refused at start instead."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from structauth.errors import ConfigurationError

__all__ = ["lock_beside"]


def lock_beside(path: Path, option: str) -> int:
    """Take ``<path>.lock`` (flock, not waiting) and return its descriptor, which holds
    the lock until closed; ConfigurationError naming ``plugin_opt_<option>`` if another
    process holds it."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigurationError(
            f"plugin_opt_{option}: {path} is in use by another process "
            f"({lock_path} is locked)") from None
    return fd
