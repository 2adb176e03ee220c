"""CPU training-step speed of a preset: threads, bf16 autocast and ``torch.compile``, measured side by side.

    python -m pipelines.training.speed_bench [--preset tiny|small] [--steps 5] [--rows 2]

Every variant is one copy of the same model (same seed) on the same packed sample-world batch (the rows of
:func:`pipelines.training.bench.packed_batch`); the variants are timed round-robin, one step of each per round, so
machine noise hits them alike, and the median of each is printed with its ratio to fp32 eager on one thread. A step is
forward + backward + AdamW. ``compile`` is ``torch.compile`` of the whole model (inductor; its first step, the
compilation, is in the warm-up and printed apart; inductor draws its own random numbers, so its first loss differs by
the diffusion noise, not only by arithmetic).

Measured on an idle 2-core machine (``--preset small --steps 3``, 2 rows of ~4 images): fp32 eager 431 ms on one
thread, 291 ms on two (1.48x), bf16 autocast 373 ms (1.15x), compiled 419 ms (1.03x, after a 156 s compilation).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import MMInterleavedConfig
from model.mm_interleaved import MMInterleaved
from pipelines.data.tokenizer import train_tokenizer
from pipelines.sample_world.documents import world_texts
from pipelines.sample_world.world import generate_world
from pipelines.training.bench import WORLD, packed_batch
from pipelines.training.checkpoint import SCRATCH_PRESETS


@dataclass(frozen=True)
class Variant:
    """How a step runs: CPU threads, bf16 autocast, ``torch.compile``."""

    name: str
    threads: int
    bf16: bool = False
    compiled: bool = False


VARIANTS = (
    Variant("fp32 eager, 1 thread", 1),
    Variant("fp32 eager, 2 threads", 2),
    Variant("bf16 autocast, 1 thread", 1, bf16=True),
    Variant("fp32 compiled, 1 thread", 1, compiled=True),
)


@dataclass(frozen=True)
class Timing:
    """One variant's result: ``median`` and ``first`` step in seconds, and the first step's loss (every variant
    starts from the same weights and batch, so the losses differ only by the variant's arithmetic)."""

    median: float
    first: float
    first_loss: float


def _stepper(model: MMInterleaved, batch, variant: Variant) -> Callable[[], tuple[float, float]]:
    optimizer = torch.optim.AdamW(model.parameter_groups())
    forward = torch.compile(model) if variant.compiled else model

    def step() -> tuple[float, float]:
        torch.set_num_threads(variant.threads)
        torch.manual_seed(0)  # the same diffusion noise and timesteps in every variant
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if variant.bf16 else nullcontext():
            loss = forward(batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start, loss.item()

    return step


def run(preset: str, steps: int, rows: int, variants: tuple[Variant, ...] = VARIANTS) -> dict[str, Timing]:
    """Every variant's :class:`Timing`, by name."""
    world = generate_world(WORLD)
    tokenizer = train_tokenizer(world_texts(world))
    steppers = {}
    for variant in variants:
        torch.manual_seed(0)
        model = MMInterleaved.from_config(getattr(MMInterleavedConfig, preset)(), tokenizer)
        with tempfile.TemporaryDirectory() as shards:
            batch = packed_batch(world, tokenizer, model, rows, Path(shards))
        steppers[variant.name] = _stepper(model, batch, variant)
    first = {name: step() for name, step in steppers.items()}  # warm-up: compilation, allocator, first calls
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(steps):
        for name, step in steppers.items():
            times[name].append(step()[0])
    return {name: Timing(statistics.median(times[name]), *first[name]) for name in steppers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=SCRATCH_PRESETS, default="small")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--rows", type=int, default=2, help="packed rows per batch (about 4 images each)")
    args = parser.parse_args()
    timings = run(args.preset, args.steps, args.rows)
    base = timings[VARIANTS[0].name].median
    print(f"preset={args.preset} rows={args.rows} rounds={args.steps} (median training-step seconds on CPU)")
    for name, timing in timings.items():
        print(f"  {name:26s} {timing.median * 1000:8.1f} ms  {base / timing.median:5.2f}x the speed of fp32 eager on "
              f"1 thread  (first step {timing.first:.1f} s, loss {timing.first_loss:.4f})")


if __name__ == "__main__":
    main()
