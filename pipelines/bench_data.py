"""Benchmarks of the packing and loading stages on the sample world (wired into ``pipelines.bench``).

    python -m pipelines.bench_data [--pairs 2000] [--stories 500] [--repeat-docs 10] [--threads 1]

:func:`bench_packing` reports tokens/s of tokenize + pack (``pack_documents``), split into text
tokens (what the tokenizer produced) and all tokens (text + image placeholders), and of the
packing step alone (``pack_tokenized`` on already tokenized documents). :func:`bench_loader`
writes the packed sequences as shards and reads them back through the training loader
(decode + collate to ``InterleavedBatch``), reporting samples/s. Single process; ``--threads 1``
(the default) also pins the Rust tokenizer (``RAYON_NUM_THREADS``) and torch to one thread, so the
numbers are per core. Besides wall-clock rates, packing reports tokens per CPU-second of this
process (``*_per_cpu_s``): on a shared machine that is the per-core rate, unaffected by other load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from pipelines.loader import bench_loader as _bench_loader
from pipelines.packing import PackingConfig, PackingStats, pack_documents, pack_tokenized, tokenize_documents
from pipelines.sample_world.world import WorldConfig, generate_world
from pipelines.shards import write_shards
from pipelines.tokenizer import token_ids, train_tokenizer, world_texts
from pipelines.world_data import world_documents, world_images


def _world(pairs: int, stories: int):
    world = generate_world(WorldConfig(seed=0, n_pairs=pairs, n_stories=stories))
    return world, train_tokenizer(world_texts(world))


def bench_packing(pairs: int = 2000, stories: int = 500, repeat_docs: int = 10, repeats: int = 2) -> dict[str, float]:
    """Tokens/s of tokenize+pack and of pack alone, best of ``repeats`` (image bytes are stand-ins)."""
    world, tokenizer = _world(pairs, stories)
    documents = world_documents(world)
    documents = [dict(d, doc_id=f"{d['doc_id']}#{r}") for r in range(repeat_docs) for d in documents]
    images = {e["key"]: b"jpeg" for d in documents for e in d["elements"] if e["type"] == "image"}
    config = PackingConfig()
    best, best_pack, best_cpu = None, None, None
    for _ in range(repeats):
        stats = PackingStats()
        start, cpu_start = time.perf_counter(), time.process_time()
        sequences = sum(1 for _ in pack_documents(documents, tokenizer, config, images=images, stats=stats))
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        if best is None or seconds < best[0]:
            best = (seconds, stats, sequences)
        best_cpu = cpu_seconds if best_cpu is None else min(best_cpu, cpu_seconds)
        tokenized = list(tokenize_documents(documents, tokenizer, config, images=images))
        start = time.perf_counter()
        sum(1 for _ in pack_tokenized(tokenized, config))
        pack_seconds = time.perf_counter() - start
        best_pack = pack_seconds if best_pack is None else min(best_pack, pack_seconds)
    seconds, stats, sequences = best
    return {
        "documents": stats.documents, "sequences": sequences, "text_tokens": stats.text_tokens, "tokens": stats.tokens,
        "seconds": seconds, "text_tokens_per_s": stats.text_tokens / seconds, "tokens_per_s": stats.tokens / seconds,
        "pack_only_tokens_per_s": stats.tokens / best_pack, "cpu_seconds": best_cpu,
        "text_tokens_per_cpu_s": stats.text_tokens / best_cpu, "tokens_per_cpu_s": stats.tokens / best_cpu,
        "fill": 1 - stats.padding_tokens / (sequences * config.max_length),
    }


def bench_loader(pairs: int = 1000, stories: int = 200, batch_size: int = 8, image_size: int = 32,
                 num_image_tokens: int = 8, repeats: int = 2) -> dict[str, float]:
    """Samples/s of the training loader over shards of packed sample-world sequences (2048 tokens)."""
    world, tokenizer = _world(pairs, stories)
    config = PackingConfig(num_image_tokens=num_image_tokens)
    sequences = pack_documents(world_documents(world), tokenizer, config, images=world_images(world))
    root = Path(tempfile.mkdtemp(prefix="weft-bench-loader-"))
    try:
        index = write_shards((s.to_sample(f"{i:08d}") for i, s in enumerate(sequences)), root, maxcount=16)
        result = _bench_loader(index.urls(root), image_size=(image_size, image_size),
                               pad_token_id=token_ids(tokenizer).pad, batch_size=batch_size, repeats=repeats)
        result["images_per_sample"] = sum(1 for d in world_documents(world) for e in d["elements"]
                                          if e["type"] == "image") / max(1, index.samples)
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench_data")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--stories", type=int, default=500)
    parser.add_argument("--repeat-docs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="tokenizer (rayon) and torch threads; 1 gives per-core numbers, 0 leaves the defaults")
    parser.add_argument("--no-loader", action="store_true", help="packing only")
    args = parser.parse_args(argv)
    if args.threads > 0:
        # read by the Rust tokenizer when its thread pool starts (first parallel encode, after this)
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
        import torch
        torch.set_num_threads(args.threads)
    packing = bench_packing(args.pairs, args.stories, args.repeat_docs)
    print(f"packing: {packing['documents']} documents -> {packing['sequences']} sequences of <= 2048 "
          f"(fill {packing['fill']:.3f}) in {packing['seconds']:.2f} s")
    print(f"packing tokens/s (tokenize + pack, 1 process): {packing['tokens_per_s']:,.0f} all tokens, "
          f"{packing['text_tokens_per_s']:,.0f} text tokens; pack alone {packing['pack_only_tokens_per_s']:,.0f}")
    print(f"packing tokens per CPU-second ({args.threads or 'default'} thread(s)): {packing['tokens_per_cpu_s']:,.0f} all tokens, "
          f"{packing['text_tokens_per_cpu_s']:,.0f} text tokens (cpu {packing['cpu_seconds']:.2f} s)")
    if args.no_loader:
        return
    loader = bench_loader()
    print(f"loader samples/s (decode + collate, 0 workers): {loader['samples_per_s']:,.1f} "
          f"({loader['tokens_per_s']:,.0f} tokens/s, {loader['images_per_sample']:.1f} images/sample, {loader['samples']} samples)")


if __name__ == "__main__":
    main()
