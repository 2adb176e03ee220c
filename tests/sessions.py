"""Stopping a subprocess the tests started in a session of its own (``start_new_session=True``), with whatever it
spawned there: a Dagster code server can outlive the CLI, the daemon or ``dagster dev`` that started it."""

import contextlib
import os
import signal
import subprocess


def stop_session(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM to ``process``'s session, up to ``timeout`` s for ``process`` to exit, then SIGKILL to whatever is left
    in the session (only processes the test started)."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
