"""Benchmarks of the data stages, each measured side by side with what it builds on.

    python -m pipelines.bench                 # packing + loader (the data benchmark)
    python -m pipelines.bench packing [--repeat-docs 10] [--mmc4-docs 2000] [--repeats 3]
    python -m pipelines.bench loader
    python -m pipelines.bench download [--images 1000] [--repeats 2] [--processes 1] [--threads 32]

``packing`` reports text tokens per CPU-second of one core (``time.process_time`` of this process
with the Rust tokenizer run serially, so the number is not skewed by other load on a shared
machine) for two document mixes (:func:`document_mixes`):

- ``sample-world``: the world's own documents (short: captions and 2-5 sentence stories), repeated
  under new ids;
- ``mmc4-length``: the world's sentences regrouped into documents of MMC4's typical length:
  ``--mmc4-chars`` (1700) characters of text, ~400 tokens, with ``--mmc4-images`` (4) images each
  (the allenai/mmc4 README, v1.1: 43B tokens, 571M images in 101.2M documents, i.e. ~425 tokens and
  ~5.6 images per document; mmc4-core ~330 tokens and ~4.1 images).

For each mix it times ``pack_documents`` (tokenize + pack), ``pack_tokenized`` alone, and the text
encoders on the mix's sentences: plain one-by-one ``Tokenizer.encode`` (the reference, ratio 1),
``encode_batch_fast`` and :class:`pipelines.data.tokenizer.TextEncoder`'s modes, the ``words`` mode both
with a cold and a warm pre-token cache. Every figure is the best of ``--repeats``. The documents
are built before timing and frozen out of the garbage collector's view (``gc.freeze``), as they
would be when streamed.

``loader`` writes packed sample-world sequences as shards and reads them back through the training
loader (decode + collate to ``InterleavedBatch``), reporting samples/s (wall time, one process).

``download`` serves a sample world over the loopback server and measures images/s of
``img2dataset.download`` alone and of weft's whole download stage on the same images (read the
source metadata, dedup URLs, host policy, img2dataset, the retry pass, statuses), alternating which
goes first, and prints the ratio stage / img2dataset.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipelines.data.documents import image_element, make_document, text_element  # noqa: E402
from pipelines.data.loader import bench_loader as loader_rate  # noqa: E402
from pipelines.data.packing import PackingConfig, PackingStats, pack_documents, pack_tokenized, tokenize_documents  # noqa: E402
from pipelines.data.shards import write_shards  # noqa: E402
from pipelines.data.tokenizer import TextEncoder, token_ids, train_tokenizer  # noqa: E402
from pipelines.sample_world.documents import world_documents, world_images, world_texts  # noqa: E402
from pipelines.sample_world.world import SampleWorld, WorldConfig, generate_world  # noqa: E402

T = TypeVar("T")
Documents = list[dict[str, Any]]


def _best_cpu(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    """Least CPU seconds (``time.process_time``: every thread of this process) of ``repeats`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.process_time()
        result = fn()
        best = min(best, time.process_time() - start)
    return best, result  # type: ignore[return-value]


def _world(pairs: int, stories: int) -> tuple[SampleWorld, Any]:
    world = generate_world(WorldConfig(seed=0, n_pairs=pairs, n_stories=stories))
    return world, train_tokenizer(world_texts(world))


# document mixes ---------------------------------------------------------------------------------
def sample_world_mix(world: SampleWorld, repeat_docs: int) -> Documents:
    """The world's documents ``repeat_docs`` times, each copy under new ids (``doc_id#r``)."""
    documents = world_documents(world)
    return [dict(d, doc_id=f"{d['doc_id']}#{r}") for r in range(repeat_docs) for d in documents]


def mmc4_length_mix(world: SampleWorld, n_docs: int, chars_per_doc: int = 1700, images_per_doc: int = 4) -> Documents:
    """``n_docs`` interleaved documents of MMC4's length: the world's texts (story sentences and
    captions, in order, wrapping around) grouped into documents of at least ``chars_per_doc``
    characters, with ``images_per_doc`` images matched to evenly spaced sentences (image keys of
    the world, wrapping around)."""
    texts = world_texts(world)
    keys = sorted(world.scenes())
    documents: Documents = []
    t = k = 0
    for d in range(n_docs):
        sentences: list[str] = []
        chars = 0
        while chars < chars_per_doc:
            sentences.append(texts[t % len(texts)])
            chars += len(sentences[-1])
            t += 1
        matched = {round(i * len(sentences) / images_per_doc) for i in range(images_per_doc)}
        elements = []
        for s, sentence in enumerate(sentences):
            if s in matched:
                image = image_element(f"http://world.invalid/images/{keys[k % len(keys)]}.jpg", matched_text_index=s)
                image.update(key=keys[k % len(keys)], status="ok")
                elements.append(image)
                k += 1
            elements.append(text_element(sentence, s))
        documents.append(make_document(doc_id=f"mmc4-length:{d}", source="mmc4", kind="interleaved", elements=elements))
    return documents


def document_mixes(world: SampleWorld, repeat_docs: int, mmc4_docs: int, mmc4_chars: int, mmc4_images: int) -> dict[str, Documents]:
    return {"sample-world": sample_world_mix(world, repeat_docs),
            "mmc4-length": mmc4_length_mix(world, mmc4_docs, mmc4_chars, mmc4_images)}


# packing ----------------------------------------------------------------------------------------
def bench_packing(documents: Documents, tokenizer, config: PackingConfig = PackingConfig(), repeats: int = 3) -> dict[str, float]:
    """Tokens per CPU-second of ``pack_documents`` (tokenize + pack) and of ``pack_tokenized`` alone.
    Image bytes are stand-ins (packing only moves them)."""
    images = {e["key"]: b"jpeg" for d in documents for e in d["elements"] if e["type"] == "image"}

    def pack() -> tuple[PackingStats, int]:
        stats = PackingStats()
        return stats, sum(1 for _ in pack_documents(documents, tokenizer, config, images=images, stats=stats))

    cpu_s, (stats, sequences) = _best_cpu(pack, repeats)
    tokenized = list(tokenize_documents(documents, tokenizer, config, images=images))
    pack_cpu_s, _ = _best_cpu(lambda: sum(1 for _ in pack_tokenized(tokenized, config)), repeats)
    return {
        "documents": stats.documents, "sequences": sequences, "images": stats.images,
        "text_tokens": stats.text_tokens, "tokens": stats.tokens, "cpu_s": cpu_s,
        "text_tokens_per_cpu_s": stats.text_tokens / cpu_s, "tokens_per_cpu_s": stats.tokens / cpu_s,
        "pack_only_tokens_per_cpu_s": stats.tokens / pack_cpu_s,
        "fill": 1 - stats.padding_tokens / (sequences * config.max_length),
    }


def mix_texts(documents: Documents) -> list[str]:
    """The mix's text elements in order (what packing sends to the text encoder)."""
    return [e["text"] for d in documents for e in d["elements"] if e["type"] == "text" and e["text"]]


def bench_text_encoders(texts: list[str], tokenizer, repeats: int = 3) -> dict[str, dict[str, float]]:
    """Text tokens per CPU-second of each way to encode ``texts``, checked equal to the reference:
    ``one-by-one`` (``backend.encode`` per text), ``encode_batch_fast`` and every
    :class:`TextEncoder` mode that applies to this tokenizer (``words-cold`` starts each run from
    an empty pre-token cache, ``words-warm`` from the cache the previous run filled)."""
    backend = tokenizer.backend_tokenizer
    reference = [backend.encode(t, add_special_tokens=False).ids for t in texts]
    n_tokens = sum(map(len, reference))
    encoder = TextEncoder(backend, token_ids(tokenizer).eos)

    def in_mode(mode: str, cold: bool) -> Callable[[], list[list[int]]]:
        def run() -> list[list[int]]:
            encoder.mode = mode
            if cold:
                encoder.clear_cache()
            return encoder(texts)
        return run

    ways: dict[str, Callable[[], list[list[int]]]] = {
        "one-by-one": lambda: [backend.encode(t, add_special_tokens=False).ids for t in texts],
        "encode_batch_fast": lambda: encoder.separate(texts),
        "joined": in_mode("joined", cold=False),
    }
    if encoder.mode == "words":
        ways["words-cold"] = in_mode("words", cold=True)
        ways["words-warm"] = in_mode("words", cold=False)
    out: dict[str, dict[str, float]] = {}
    for name, fn in ways.items():
        cpu_s, encoded = _best_cpu(fn, repeats)
        if encoded != reference:
            raise RuntimeError(f"text encoder {name!r} differs from one-by-one encoding")
        out[name] = {"cpu_s": cpu_s, "text_tokens_per_cpu_s": n_tokens / cpu_s}
    for result in out.values():
        result["ratio"] = result["text_tokens_per_cpu_s"] / out["one-by-one"]["text_tokens_per_cpu_s"]
    return out


# loader -----------------------------------------------------------------------------------------
def bench_loader(pairs: int = 1000, stories: int = 200, batch_size: int = 8, image_size: int = 32,
                 num_image_tokens: int = 8, repeats: int = 2) -> dict[str, float]:
    """Samples/s of the training loader over shards of packed sample-world sequences (2048 tokens)."""
    world, tokenizer = _world(pairs, stories)
    config = PackingConfig(num_image_tokens=num_image_tokens)
    stats = PackingStats()
    sequences = pack_documents(world_documents(world), tokenizer, config, images=world_images(world), stats=stats)
    root = Path(tempfile.mkdtemp(prefix="weft-bench-loader-"))
    try:
        index = write_shards((s.to_sample(f"{i:08d}") for i, s in enumerate(sequences)), root, maxcount=16)
        result = loader_rate(index.urls(root), image_size=(image_size, image_size),
                             pad_token_id=token_ids(tokenizer).pad, batch_size=batch_size, repeats=repeats)
        result["images_per_sample"] = stats.images / max(1, index.samples)
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


# download ---------------------------------------------------------------------------------------
def bench_download(images: int, repeats: int, processes: int, threads: int, image_size: int) -> dict[str, float]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.data.download import DownloadConfig, download_documents, run_img2dataset
    from pipelines.data.errors import BadRecordLog
    from pipelines.data.hosts import HostPolicy
    from pipelines.data.readers import read_source
    from pipelines.sample_world.formats import write_metadata
    from pipelines.sample_world.image_server import ImageServer

    n_stories = max(1, images // 10)
    world = generate_world(WorldConfig(seed=0, n_pairs=images - 4 * n_stories, n_stories=n_stories,
                                       min_story_images=4, max_story_images=4, image_size=image_size))
    config = DownloadConfig(image_size=image_size, resize_mode="no", processes_count=processes, thread_count=threads,
                            number_sample_per_shard=1000, timeout=10)
    root = Path(tempfile.mkdtemp(prefix="weft-bench-"))
    try:
        with ImageServer(world.routes(), max_threads=max(32, threads)) as server:
            written = write_metadata(world, root / "meta", server.base_url)
            sources = [p for k in ("mmc4", "laion", "cc12m") for p in written[k]]
            urls = [e["url"] for p in sources for d in read_source(p) for e in d["elements"] if e["type"] == "image"]
            url_list = root / "urls.parquet"
            pq.write_table(pa.table({"url": urls, "url_id": [str(i) for i in range(len(urls))]}), url_list)
            policy = HostPolicy.allowing(server.base_url)

            def img2dataset_alone(out: Path) -> None:
                run_img2dataset(url_list, out, config, policy, incremental_mode="incremental")  # out is fresh

            def whole_stage(out: Path) -> None:
                log = BadRecordLog()
                docs = (d for p in sources for d in read_source(p, log))
                result = download_documents(docs, out, config, policy)
                if result.counts.get("ok") != len(urls):
                    raise RuntimeError(f"stage fetched {result.counts} of {len(urls)} images")

            best = {"img2dataset": float("inf"), "stage": float("inf")}
            for repeat in range(repeats):
                runs = [("img2dataset", img2dataset_alone), ("stage", whole_stage)]
                for name, fn in runs if repeat % 2 == 0 else runs[::-1]:  # alternate who goes first
                    out = root / f"{name}-{repeat}"
                    start = time.perf_counter()
                    fn(out)
                    best[name] = min(best[name], time.perf_counter() - start)
                    shutil.rmtree(out)
        return {"images": len(urls), "img2dataset_s": best["img2dataset"], "stage_s": best["stage"],
                "img2dataset_images_per_s": len(urls) / best["img2dataset"],
                "stage_images_per_s": len(urls) / best["stage"]}
    finally:
        shutil.rmtree(root, ignore_errors=True)


# command line -----------------------------------------------------------------------------------
def _one_core(threads: int) -> None:
    """Pin the Rust tokenizer and torch to ``threads`` (1: the tokenizer runs serially on this thread)."""
    if threads <= 0:
        return
    # both read by `tokenizers` when it encodes a batch (after this point)
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    if threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import torch
    torch.set_num_threads(threads)


def run_packing(args: argparse.Namespace) -> None:
    world, tokenizer = _world(args.pairs, args.stories)
    mixes = document_mixes(world, args.repeat_docs, args.mmc4_docs, args.mmc4_chars, args.mmc4_images)
    print(f"packing, tokens per CPU-second ({args.threads or 'default'} thread(s), best of {args.repeats}); "
          f"tokenizer: sample-world byte-level BPE, {len(tokenizer)} tokens")
    # The packing asset streams documents; held all at once, every full garbage collection during
    # the timed runs would walk them, a cost a streaming run does not pay. Freeze them out of its view.
    gc.collect()
    gc.freeze()
    try:
        for name, documents in mixes.items():
            _print_packing(name, documents, tokenizer, args.repeats)
    finally:
        gc.unfreeze()


def _print_packing(name: str, documents: Documents, tokenizer, repeats: int) -> None:
    packing = bench_packing(documents, tokenizer, repeats=repeats)
    print(f"[{name}] {packing['documents']} documents, {packing['text_tokens'] / packing['documents']:.0f} text "
          f"tokens and {packing['images'] / packing['documents']:.1f} images per document -> "
          f"{packing['sequences']} sequences of <= 2048 (fill {packing['fill']:.3f})")
    print(f"  pack_documents (tokenize + pack): {packing['text_tokens_per_cpu_s']:13,.0f} text tokens/s "
          f"({packing['tokens_per_cpu_s']:,.0f} incl. image tokens; cpu {packing['cpu_s']:.2f} s)")
    print(f"  pack_tokenized alone:             {packing['pack_only_tokens_per_cpu_s']:13,.0f} tokens/s (incl. image tokens)")
    for way, result in bench_text_encoders(mix_texts(documents), tokenizer, repeats).items():
        print(f"  encode {way:<27} {result['text_tokens_per_cpu_s']:13,.0f} text tokens/s  "
              f"x{result['ratio']:.2f} vs one-by-one")


def run_loader(args: argparse.Namespace) -> None:
    loader = bench_loader(repeats=args.repeats)
    print(f"loader samples/s (decode + collate, 0 workers, wall): {loader['samples_per_s']:,.1f} "
          f"({loader['tokens_per_s']:,.0f} tokens/s, {loader['images_per_sample']:.1f} images/sample, "
          f"{loader['samples']} samples)")


def run_download(args: argparse.Namespace) -> None:
    result = bench_download(args.images, args.repeats, args.processes, args.threads, args.image_size)
    print(f"images: {result['images']} ({args.image_size} px, processes={args.processes}, threads={args.threads}, "
          f"best of {args.repeats})")
    print(f"img2dataset.download alone: {result['img2dataset_images_per_s']:8.1f} images/s ({result['img2dataset_s']:.2f} s)")
    print(f"weft download stage:        {result['stage_images_per_s']:8.1f} images/s ({result['stage_s']:.2f} s)")
    print(f"ratio stage / img2dataset:  {result['stage_images_per_s'] / result['img2dataset_images_per_s']:.3f}")


def _parser() -> argparse.ArgumentParser:
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--threads", type=int, default=1,
                      help="tokenizer (rayon) and torch threads; 1 gives per-core numbers, 0 leaves the defaults")
    data.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    data.add_argument("--pairs", type=int, default=2000, help="sample world size: image-text pairs")
    data.add_argument("--stories", type=int, default=500, help="sample world size: interleaved stories")
    data.add_argument("--repeat-docs", type=int, default=10, help="copies of the sample world's documents")
    data.add_argument("--mmc4-docs", type=int, default=2000, help="documents of the mmc4-length mix")
    data.add_argument("--mmc4-chars", type=int, default=1700, help="text characters per mmc4-length document")
    data.add_argument("--mmc4-images", type=int, default=4, help="images per mmc4-length document")
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench", parents=[data],
                                     description="data stage benchmarks; without a subcommand: packing + loader")
    sub = parser.add_subparsers(dest="bench")
    sub.add_parser("packing", parents=[data], help="tokenize + pack: text tokens per CPU-second, two document mixes")
    sub.add_parser("loader", parents=[data], help="training loader over packed shards: samples/s")
    download = sub.add_parser("download", help="the download stage vs img2dataset.download alone")
    download.add_argument("--images", type=int, default=1000)
    download.add_argument("--repeats", type=int, default=2)
    download.add_argument("--processes", type=int, default=1)
    download.add_argument("--threads", type=int, default=32, help="img2dataset download threads")
    download.add_argument("--image-size", type=int, default=64)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.bench == "download":
        run_download(args)
        return
    _one_core(args.threads)
    if args.bench in (None, "packing"):
        run_packing(args)
    if args.bench in (None, "loader"):
        run_loader(args)


if __name__ == "__main__":
    main()
