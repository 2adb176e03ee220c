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


def _state_and_parent(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent pid from ``/proc/<pid>/stat`` (Linux); ``None`` once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid
    except OSError:
        return None
    return fields[0], int(fields[1])


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, their children, ...), from ``/proc`` (Linux)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _state_and_parent(int(entry.name))
        if stat is not None and stat[0] != "Z":
            parents.setdefault(stat[1], []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (not exited, not zombies)."""
    return {pid for pid in pids if (stat := _state_and_parent(pid)) is not None and stat[0] != "Z"}
