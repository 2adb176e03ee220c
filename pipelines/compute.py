"""Where a stage runs torch: the device and the CPU threads, and the process settings every entry point needs."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Compute:
    """The device a stage runs its models on and the CPU threads torch may use meanwhile."""

    device: str = "cpu"
    """``cpu``, ``cuda`` or ``cuda:N``."""
    torch_threads: int = 0
    """CPU threads while a stage runs torch; 0 keeps torch's setting (all cores: right for one process alone).
    Set 1 when several processes share a small CPU: tiny models are several times slower when threads
    oversubscribe it (measured: ~1 s instead of 5-50 s per training step with 3 busy processes on 2 cores)."""

    def __post_init__(self) -> None:
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0, got {self.torch_threads}")

    def threads(self):
        """``with compute.threads(): ...`` runs the block with :attr:`torch_threads` (see :func:`cpu_threads`)."""
        return cpu_threads(self.torch_threads)


@contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block, restored after it (0: unchanged)."""
    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def offline_process() -> None:
    """Settings of a process started from the command line: no model hub, no update check on import
    (albumentations, pulled in by img2dataset, phones home unless told not to), INFO logging."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
