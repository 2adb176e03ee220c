"""One writer per run folder: a lock each training rank holds on ``{run_dir}/.lock/rank{r}`` while it runs.

Two trainings in one folder would each report success while their checkpoints and ``metrics.jsonl``
interleave. The lock is the kernel's (``fcntl.flock``, which Linux also honours on NFS), so it goes with the
process that held it: a training killed with ``kill -9`` leaves a file behind but no lock, and the next one takes
it over (the file names the last holder, for the message a refused training prints). Taken before anything is
written, a refused training changes nothing in the folder. The same thread may take it again (the checkpoint stage
holds it around its untrained twin and the training it then calls).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_DIR = ".lock"
_held: dict[Path, tuple[int, int]] = {}
"""Lock file -> (thread that holds it, how many times), for the locks this process holds."""
_held_guard = threading.Lock()


class RunFolderLocked(RuntimeError):
    """Another process (or thread) is training in this run folder."""


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
    except (OSError, ValueError, KeyError):
        return "another process"


@contextmanager
def run_folder_lock(run_dir: str | os.PathLike, rank: int = 0) -> Iterator[Path]:
    """Hold rank ``rank``'s lock of ``run_dir`` for the block; :class:`RunFolderLocked` if someone else holds it."""
    path = (Path(run_dir) / LOCK_DIR / f"rank{rank}").absolute()
    me = threading.get_ident()
    with _held_guard:
        owner, depth = _held.get(path, (None, 0))
        if owner == me:
            _held[path] = (me, depth + 1)
        elif owner is not None:
            raise RunFolderLocked(f"{run_dir} is in use by another thread of this process (one training per run folder)")
    if owner == me:
        try:
            yield path
        finally:
            with _held_guard:
                _held[path] = (me, _held[path][1] - 1)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderLocked(f"{run_dir} is in use by {_holder(path)} (rank {rank}): one training per run "
                                  "folder; wait for it, stop it, or train in another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        with _held_guard:
            _held[path] = (me, 1)
        try:
            yield path
        finally:
            with _held_guard:
                del _held[path]
    finally:
        os.close(fd)  # releases the lock
