"""Training-step time with MMFS on vs off and with 32 vs 256 visual tokens, measured side by side.

    python -m model.bench [--steps 5] [--rows 2] [--device cpu]

The four variants of the ``tiny`` preset are timed round-robin (one step of each per round, so
machine noise hits them alike) on the same packed documents; each step is forward + backward +
AdamW. The paper reports +6% runtime for MMFS, and 32 tokens + MMFS 1.3x faster than 256 without.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model.config import MMInterleavedConfig
from model.mm_interleaved import MMInterleaved
from model.tiny import tiny_batch, tiny_tokenizer

VARIANTS = [(True, 32), (False, 32), (True, 256), (False, 256)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host-device sync: time the kernels, not their launch


def run(steps: int, rows: int, device: torch.device) -> dict[tuple[bool, int], float]:
    tokenizer = tiny_tokenizer()
    setups = {}
    for mmfs, tokens in VARIANTS:
        torch.manual_seed(0)
        model = MMInterleaved.from_config(MMInterleavedConfig.tiny(num_visual_tokens=tokens, mmfs=mmfs), tokenizer).to(device)
        batch = tiny_batch(model, rows=rows).to(device)
        optimizer = torch.optim.AdamW(model.parameter_groups())
        setups[(mmfs, tokens)] = (model, batch, optimizer)

    def step(model, batch, optimizer) -> float:
        _sync(device)
        start = time.perf_counter()
        loss = model(batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        return time.perf_counter() - start

    for setup in setups.values():  # warm-up: kernel builds, allocator, first-call overheads
        step(*setup)
    times: dict[tuple[bool, int], list[float]] = {key: [] for key in setups}
    for _ in range(steps):
        for key, setup in setups.items():
            times[key].append(step(*setup))
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--rows", type=int, default=2, help="packed rows per batch (3 images each)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    medians = run(args.steps, args.rows, device)
    print(f"device={device} rows={args.rows} rounds={args.steps} (median training-step seconds)")
    for (mmfs, tokens), seconds in medians.items():
        print(f"  MMFS {'on ' if mmfs else 'off'}  {tokens:3d} visual tokens: {seconds * 1000:8.1f} ms")
    print(f"MMFS on / off, 32 tokens:               {medians[(True, 32)] / medians[(False, 32)]:.3f}x")
    print(f"MMFS on / off, 256 tokens:              {medians[(True, 256)] / medians[(False, 256)]:.3f}x")
    print(f"256 tokens w/o MMFS / 32 tokens + MMFS: {medians[(False, 256)] / medians[(True, 32)]:.3f}x (speed-up of 32+MMFS)")


if __name__ == "__main__":
    main()
