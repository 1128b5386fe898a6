"""What every CLI shares: logging to the console, and user errors printed as one clear line, not a traceback."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys

from stsc_tf.errors import STSCError


def setup_logging() -> None:
    logger = logging.getLogger("stsc_tf")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO)


def no_extra_args(argv: list[str]) -> None:
    setup_logging()
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {argv[1:]} (flags are --name=value)")


@contextlib.contextmanager
def user_errors():
    """Turns an STSCError, or a file the system refuses (permissions, a full disk, a missing folder), into
    `error: <message>` and exit status 2."""
    try:
        yield
    except STSCError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # h5py may crash at exit over a half-written file: end now
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        raise SystemExit(2) from None
