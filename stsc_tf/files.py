"""Writing files whole or not at all, and reading back CSVs this package wrote.

Every file a later step reads is written to a temporary name in its own folder, flushed to disk and renamed over
the target (`os.replace` is atomic on POSIX within one file system): a kill leaves the old file or the new one,
never a part. Temporary names start with '.' and end with '.tmp', so a rerun can recognise and remove leftovers.
CSV files are written and read with the csv module's quoting (pandas), so ids with commas, quotes, spaces or
non-ASCII characters survive the round trip.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import tempfile

import pandas as pd

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: mkstemp creates 0600 files, a run folder's files get the usual 0666 & ~umask


def temp_path(path: str, suffix: str = "") -> str:
    """A new, empty temporary file beside `path` (same folder, so the final rename is atomic)."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp" + suffix, dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    return tmp


def commit(tmp: str, path: str) -> None:
    """fsync `tmp` and rename it to `path`."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)  # what a full or failing disk says


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yields a temporary path to write; on success it becomes `path`, on any error it is removed.

    An OSError (a read-only folder, a full disk) names `path`, not the temporary file; a write error that names
    no file (a stream's write or flush) names `path` too.
    """
    try:
        tmp = temp_path(path, suffix)
    except OSError as e:
        raise OSError(e.errno, f"cannot be written ({e.strerror or e})", path) from None
    try:
        yield tmp
        commit(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and (e.filename == tmp or (e.filename is None and e.errno in WRITE_ERRORS)):
            raise OSError(e.errno, f"cannot be written ({e.strerror}); nothing was replaced", path) from None
        raise


def remove_stale_temps(folder: str, names: tuple[str, ...] | None = None) -> list[str]:
    """Removes the temporary files (`.NAME.XXXX.tmp*`) that a killed writer of `names` (default: any) left in
    `folder`; returns their names.

    Call it only while no other process writes those files (e.g. under the run folder's lock, for the files only
    training writes).
    """
    if not os.path.isdir(folder):
        return []
    stale = [e for e in os.listdir(folder) if e.startswith(".") and ".tmp" in e and
             os.path.isfile(os.path.join(folder, e)) and
             (names is None or any(e.startswith(f".{n}.") for n in names))]
    for name in stale:
        os.remove(os.path.join(folder, name))
    return stale


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def atomic_write_csv(path: str, frame: pd.DataFrame) -> None:
    """A DataFrame as CSV (csv-module quoting, UTF-8), atomically."""
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    atomic_write_text(path, buffer.getvalue())


def read_csv(path: str, **kwargs) -> pd.DataFrame:
    """Reads a CSV this package wrote: same quoting, empty cells stay '' (not NaN)."""
    return pd.read_csv(path, keep_default_na=False, encoding="utf-8", **kwargs)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_plus(value: str) -> list[str]:
    """'a.csv+b.csv' -> ['a.csv', 'b.csv']; a name that holds '+' itself stays whole when that file exists
    (the longest run of parts naming an existing path wins), so a folder like 'runs/a+b' needs no escaping."""
    parts, out, i = value.split("+"), [], 0
    while i < len(parts):
        j = next((j for j in range(len(parts), i + 1, -1) if os.path.exists("+".join(parts[i:j]))), i + 1)
        out.append("+".join(parts[i:j]))
        i = j
    return out


def try_lock(handle, mode: int) -> bool:
    """flock(mode | LOCK_NB) on an open file: True when locked, False when another process holds a conflicting lock.
    A filesystem without flock (some network or FUSE mounts) gets a warning and no lock, rather than a refusal of
    every caller. The kernel releases the lock when the file is closed or its process dies."""
    try:
        fcntl.flock(handle.fileno(), mode | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        logging.getLogger("stsc_tf").warning("cannot lock %s (%s): concurrent runs are not kept apart there",
                                             handle.name, e.strerror or e)
        return True
