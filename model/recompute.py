"""Gradient checkpointing's one decision, shared by the modules that offer it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def maybe_checkpoint(enabled: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; when ``enabled`` and autograd is recording, under a non-reentrant checkpoint, so that ``fn``'s
    activations are recomputed in the backward instead of kept."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
