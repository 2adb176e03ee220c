"""Benchmark every available backend of ``ms_deform_sample`` side by side, in one run.

    python -m cuda_ops.bench                       # CPU here; the CUDA kernel too on a GPU machine
    python -m cuda_ops.bench --dtype bfloat16 --shapes mmfs_llm

For each shape it prints forward and forward+backward time of each backend, the ratio to the
reference (>1 = faster than the reference), and on GPU the achieved bandwidth over the
compulsory bytes (inputs read once, outputs written once) against the device's peak.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

import torch

# torch.utils.benchmark imports cpp_extension, which warns that this CPU machine has no CUDA
# runtime; cuda_ops.build resolves the toolkit itself, so the warning only misleads here.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils import benchmark  # noqa: E402

from cuda_ops import ms_deform_sample


@dataclass(frozen=True)
class Shape:
    """One benchmark problem: batch, queries, heads, channels per head, levels, points."""

    n: int
    lq: int
    m: int
    d: int
    levels: tuple[tuple[int, int], ...]
    p: int


SHAPES = {
    # MMFS in the LLM: K = 4 images x levels 32^2, 16^2, 8^2 passed as 12 "levels".
    "mmfs_llm": Shape(2, 2048, 16, 64, ((32, 32), (16, 16), (8, 8)) * 4, 8),
    # MMFS in the UNet: one query per pixel of a 32x32 feature map, 4 levels of one image.
    "mmfs_unet": Shape(2, 32 * 32, 16, 64, ((64, 64), (32, 32), (16, 16), (8, 8)), 8),
    # Deformable-DETR encoder: every pixel of a 4-level pyramid queries the pyramid.
    "detr_encoder": Shape(2, 100 * 150 + 50 * 75 + 25 * 38 + 13 * 19, 8, 32, ((100, 150), (50, 75), (25, 38), (13, 19)), 4),
    # The tiny preset's MMFS in the LLM (the demo and CI run it on CPU).
    "tiny_llm": Shape(2, 512, 4, 16, ((8, 8), (4, 4), (2, 2)) * 4, 4),
}


def make_problem(shape: Shape, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    """Random inputs of ``shape``; weights are softmax-normalised as MMFS would pass them."""
    spatial_shapes = torch.tensor(shape.levels, dtype=torch.int64, device=device)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(shape.levels)
    value = torch.randn(shape.n, int(sizes.sum()), shape.m, shape.d, device=device, dtype=dtype)
    locations = torch.rand(shape.n, shape.lq, shape.m, levels, shape.p, 2, device=device, dtype=dtype)
    logits = torch.randn(shape.n, shape.lq, shape.m, levels * shape.p, device=device)
    weights = logits.softmax(-1).view(shape.n, shape.lq, shape.m, levels, shape.p).to(dtype)
    return value, spatial_shapes, level_start_index, locations, weights


def compulsory_bytes(inputs: tuple[torch.Tensor, ...], backward: bool) -> int:
    """Bytes every implementation must move: inputs read and outputs written once."""
    value, _, _, locations, weights = inputs
    n, _, m, d = value.shape
    output = n * locations.shape[1] * m * d * value.element_size()
    forward = value.nbytes + locations.nbytes + weights.nbytes + output
    # backward: re-read the inputs and grad_output, write three gradients of the inputs' sizes
    return forward + (value.nbytes + locations.nbytes + weights.nbytes + output) * 2 if backward else forward


def peak_bandwidth_gbs(device: torch.device) -> float | None:
    """Peak DRAM bandwidth from the device properties (double data rate), or None if unknown."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def time_backend(backend: str, inputs: tuple[torch.Tensor, ...], backward: bool, min_time: float) -> float:
    """Median seconds per call of forward (and backward) with ``backend`` forced."""
    os.environ["WEFT_DEFORM_BACKEND"] = backend
    value, shapes, starts, locations, weights = (t.detach() for t in inputs)
    if backward:
        value, locations, weights = (t.clone().requires_grad_() for t in (value, locations, weights))
        grad = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3], device=value.device, dtype=value.dtype)
        stmt = "ms_deform_sample(value, shapes, starts, locations, weights).backward(grad)"
    else:
        grad = None
        stmt = "ms_deform_sample(value, shapes, starts, locations, weights)"
    timer = benchmark.Timer(
        stmt=stmt,
        globals=dict(
            ms_deform_sample=ms_deform_sample, value=value, shapes=shapes, starts=starts,
            locations=locations, weights=weights, grad=grad,
        ),
        num_threads=torch.get_num_threads(),
    )
    timer.timeit(1)  # warm-up: builds or loads the kernel, fills caches
    return timer.blocked_autorange(min_run_time=min_time).median


def available_backends(device: str) -> list[str]:
    from cuda_ops.build import KernelBuildError, load_kernels

    kind = "cuda" if device.startswith("cuda") else "cpu"
    try:
        load_kernels(kind)
    except KernelBuildError as error:
        print(f"{kind} kernel unavailable: {error}")
        return ["reference"]
    return ["reference", kind]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cuda_ops.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per measurement")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    backends = available_backends(args.device)
    on_gpu = args.device.startswith("cuda")
    peak = peak_bandwidth_gbs(torch.device(args.device)) if on_gpu else None
    print(f"device={args.device} dtype={dtype} threads={torch.get_num_threads()} torch={torch.__version__}")
    if peak:
        print(f"peak memory bandwidth ~{peak:.0f} GB/s")
    header = f"{'shape':<14}{'pass':<10}{'backend':<11}{'ms':>10}{'vs ref':>9}"
    print(header + (f"{'GB/s':>9}{'% peak':>8}" if on_gpu else ""))
    for name in args.shapes:
        inputs = make_problem(SHAPES[name], dtype, args.device)
        for backward in (False, True):
            times = {b: time_backend(b, inputs, backward, args.min_time) for b in backends}
            for backend, seconds in times.items():
                row = f"{name:<14}{'fwd+bwd' if backward else 'fwd':<10}{backend:<11}{seconds * 1e3:>10.3f}{times['reference'] / seconds:>8.2f}x"
                if on_gpu:
                    rate = compulsory_bytes(inputs, backward) / seconds / 1e9
                    row += f"{rate:>9.0f}" + (f"{100 * rate / peak:>7.0f}%" if peak else "")
                print(row, flush=True)


if __name__ == "__main__":
    main()
