"""Training-step time with MMFS on vs off and with 32 vs 256 visual tokens, measured side by side.

    python -m pipelines.training.bench [--steps 5] [--rows 2] [--device cpu]

The four variants of the ``tiny`` preset are timed round-robin (one step of each per round, so
machine noise hits them alike) on the same sample-world documents, packed for each variant's visual
tokens into sequences of about four images and read back through the training loader; each step is
forward + backward + AdamW. The paper reports +6% runtime for MMFS, and 32 tokens + MMFS 1.3x faster
than 256 without.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from model.batch import InterleavedBatch
from model.config import MMInterleavedConfig
from model.mm_interleaved import MMInterleaved
from pipelines.data.loader import collate_sequences, sequence_dataset
from pipelines.data.packing import PackingConfig, pack_documents
from pipelines.data.shards import write_shards
from pipelines.data.tokenizer import token_ids, train_tokenizer
from pipelines.sample_world.documents import world_documents, world_images, world_texts
from pipelines.sample_world.world import SampleWorld, WorldConfig, generate_world

VARIANTS = [(True, 32), (False, 32), (True, 256), (False, 256)]
WORLD = WorldConfig(seed=0, n_pairs=16, n_stories=8, n_eval=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host-device sync: time the kernels, not their launch


def packed_batch(world: SampleWorld, tokenizer, model, rows: int, out_dir: Path) -> InterleavedBatch:
    """The first ``rows`` sequences of ``world``'s documents packed for ``model``'s visual tokens (room for about
    four images each), written as shards and read back through the training loader."""
    tokens = model.num_visual_tokens
    packing = PackingConfig(max_length=4 * (tokens + 1) + 64, num_image_tokens=tokens, seed=0)
    sequences = pack_documents(world_documents(world), tokenizer, packing, images=world_images(world))
    index = write_shards((s.to_sample(f"{i:06d}") for i, s in enumerate(itertools.islice(sequences, rows))), out_dir)
    samples = list(sequence_dataset(index.urls(out_dir), image_size=model.image_size, shuffle_buffer=1))
    return collate_sequences(samples, pad_token_id=token_ids(tokenizer).pad, image_size=model.image_size)


def run(steps: int, rows: int, device: torch.device) -> dict[tuple[bool, int], float]:
    world = generate_world(WORLD)
    tokenizer = train_tokenizer(world_texts(world))
    setups = {}
    for mmfs, tokens in VARIANTS:
        torch.manual_seed(0)
        model = MMInterleaved.from_config(MMInterleavedConfig.tiny(num_visual_tokens=tokens, mmfs=mmfs), tokenizer).to(device)
        with tempfile.TemporaryDirectory() as shards:
            batch = packed_batch(world, tokenizer, model, rows, Path(shards)).to(device)
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
    parser.add_argument("--rows", type=int, default=2, help="packed rows per batch (about 4 images each)")
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
