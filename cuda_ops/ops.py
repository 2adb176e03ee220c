"""The ``weft::ms_deform_sample`` custom op: one op, three backends, traceable by torch.compile.

Backends are chosen per call by device and ``WEFT_DEFORM_BACKEND``:

- ``auto`` (default): the compiled kernel of the tensors' device (``cuda`` or ``cpu``); if it
  cannot be built, warn once with the compiler log's path and use ``reference``.
- ``cuda`` / ``cpu``: that compiled kernel or an error (also an error for tensors on the other
  device).
- ``reference``: the pure-PyTorch implementation (:mod:`cuda_ops.reference`).

The op's schema is declared here (not in C++) so that it exists on machines where no kernel can
be built. Autograd is registered with a backward that is itself a custom op; the backward's value
gradient is bitwise reproducible when ``torch.use_deterministic_algorithms(True)`` is on.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch
from torch import Tensor

from cuda_ops.reference import ms_deform_sample_reference, ms_deform_sample_reference_backward

BACKENDS = ("auto", "cuda", "cpu", "reference")
_warned_fallback: set[str] = set()


def requested_backend() -> str:
    """The backend asked for by ``WEFT_DEFORM_BACKEND`` (``auto`` when unset)."""
    backend = os.environ.get("WEFT_DEFORM_BACKEND", "auto").strip().lower()
    if backend not in BACKENDS:
        raise ValueError(f"WEFT_DEFORM_BACKEND={backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


def select_kernels(device: torch.device) -> ModuleType | None:
    """Compiled kernels for ``device``, or ``None`` to use the reference."""
    backend = requested_backend()
    if backend == "reference":
        return None
    # Imported here so that `python -m cuda_ops.build` does not import itself through the package.
    from cuda_ops.build import KernelBuildError, load_kernels

    kind = "cuda" if device.type == "cuda" else "cpu"
    if backend == "auto":
        if device.type not in ("cpu", "cuda"):
            return None
        try:
            return load_kernels(kind)
        except KernelBuildError as error:
            if kind not in _warned_fallback:
                _warned_fallback.add(kind)
                warnings.warn(f"{error}; using the PyTorch reference instead", stacklevel=3)
            return None
    if backend != kind:
        raise ValueError(f"WEFT_DEFORM_BACKEND={backend} but the tensors are on {device}")
    return load_kernels(kind)


def _output_shape(value: Tensor, sampling_locations: Tensor) -> tuple:
    n, _, m, d = value.shape
    return (n, sampling_locations.shape[1], m * d)


@torch.library.custom_op("weft::ms_deform_sample", mutates_args=())
def _ms_deform_sample(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    kernels = select_kernels(value.device)
    if kernels is None:
        return ms_deform_sample_reference(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return kernels.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@_ms_deform_sample.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return value.new_empty(_output_shape(value, sampling_locations))


@torch.library.custom_op("weft::ms_deform_sample_backward", mutates_args=())
def _ms_deform_sample_backward(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    kernels = select_kernels(value.device)
    if kernels is not None:
        return tuple(
            kernels.backward(
                grad_output,
                value,
                spatial_shapes,
                level_start_index,
                sampling_locations,
                attention_weights,
                deterministic,
            )
        )
    return ms_deform_sample_reference_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


@_ms_deform_sample_backward.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, deterministic):
    return (
        torch.empty_like(value),
        torch.empty_like(sampling_locations),
        torch.empty_like(attention_weights),
    )


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = _ms_deform_sample_backward(
        grad_output.contiguous(),
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        torch.are_deterministic_algorithms_enabled(),
    )
    return grad_value, None, None, grad_locations, grad_weights


_ms_deform_sample.register_autograd(_backward, setup_context=_setup_context)


def _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    """Shape and dtype checks that need no data (so they also run on fake tensors)."""
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, M, D), got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be (N, Lq, M, L, P, 2), got shape {tuple(sampling_locations.shape)}"
        )
    n, _, m, _ = value.shape
    loc_n, _, loc_m, levels, _, _ = sampling_locations.shape
    if (loc_n, loc_m) != (n, m):
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} does not match value {tuple(value.shape)} in N or M"
        )
    if tuple(spatial_shapes.shape) != (levels, 2) or tuple(level_start_index.shape) != (levels,):
        raise ValueError(
            f"spatial_shapes must be ({levels}, 2) and level_start_index ({levels},) for L = {levels} levels, "
            f"got {tuple(spatial_shapes.shape)} and {tuple(level_start_index.shape)}"
        )
    if tuple(attention_weights.shape) != tuple(sampling_locations.shape[:5]):
        raise ValueError(
            f"attention_weights {tuple(attention_weights.shape)} must equal "
            f"sampling_locations.shape[:5] = {tuple(sampling_locations.shape[:5])}"
        )
    if not value.is_floating_point() or not (value.dtype == sampling_locations.dtype == attention_weights.dtype):
        raise TypeError(
            "value, sampling_locations and attention_weights must share one floating dtype, got "
            f"{value.dtype}, {sampling_locations.dtype}, {attention_weights.dtype}"
        )
    if spatial_shapes.dtype != torch.int64 or level_start_index.dtype != torch.int64:
        raise TypeError(
            f"spatial_shapes and level_start_index must be int64, got {spatial_shapes.dtype} and {level_start_index.dtype}"
        )


def ms_deform_sample(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable sampling (Deformable-DETR's ``MSDeformAttnFunction``), any device.

    Args:
        value: ``(N, S, M, D)`` flattened feature maps of all levels, ``S = sum(H_l * W_l)``.
        spatial_shapes: ``(L, 2)`` int64 ``(H_l, W_l)``.
        level_start_index: ``(L,)`` int64 start of each level along S.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)``; pixel = ``loc * W - 0.5``;
            points outside ``[0, 1]`` read zeros beyond the border.
        attention_weights: ``(N, Lq, M, L, P)`` weight of each sample (already normalised).

    Returns:
        ``(N, Lq, M * D)``; differentiable in value, sampling_locations and attention_weights.
    """
    _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _ms_deform_sample(
        value.contiguous(),
        spatial_shapes.contiguous(),
        level_start_index.contiguous(),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
    )
