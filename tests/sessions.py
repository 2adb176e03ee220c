"""Stopping a subprocess the tests started in a session of its own (``start_new_session=True``), with whatever it
spawned there: a Dagster code server can outlive the CLI, the daemon or ``dagster dev`` that started it."""

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def stop_session(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM to ``process``'s session, up to ``timeout`` s for ``process`` to exit, then SIGKILL to whatever is left
    in the session (only processes the test started)."""
    with contextlib.suppress(ProcessLookupError):  # the session may have ended already
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, their children, ...), from ``/proc`` (Linux)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
            if fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (not exited, not zombies)."""
    running = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                running.add(pid)
    return running
