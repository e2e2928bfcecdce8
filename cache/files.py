"""Files featcache writes are written as themselves, never through a link planted where they go.

A link at a run's ``eval/`` folder, an export's temporary file or a heatmap's path would carry
featcache's write to wherever it points: outside the cache, the runs folder, or the output the
user chose. Each such path is opened without following a final link (``O_NOFOLLOW``), and a
folder featcache writes into must not be a link itself; either is a one-line error naming it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from featcache.cache.errors import FeatcacheError

HINT = "remove the link (its target is left as it is) or choose another output path"


def open_new(path: Path, mode: str = "w"):
    """``path`` opened for writing from empty, as a file of its own: a symbolic link there is refused."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise FeatcacheError(f"{path} is a symbolic link; featcache does not write through links", HINT) from None
        raise
    return os.fdopen(fd, mode)


def write_text(path: Path, text: str) -> Path:
    """``text`` as the file ``path`` (``open_new``: a link there is refused, never written through)."""
    with open_new(path) as f:
        f.write(text)
    return Path(path)


def real_folder(path: Path) -> Path:
    """``path`` as a folder to write into (made if absent), refused if it is a symbolic link."""
    path = Path(path)
    if path.is_symlink():
        raise FeatcacheError(f"the folder {path} is a symbolic link; featcache does not write through links", HINT)
    path.mkdir(parents=True, exist_ok=True)
    return path


def refuse_link(path: Path) -> Path:
    """``path``, which a library (h5py, matplotlib) is about to create: refused if it is a link."""
    if Path(path).is_symlink():
        raise FeatcacheError(f"{path} is a symbolic link; featcache does not write through links", HINT)
    return Path(path)
