"""Benchmarks of data stages against the tools they wrap.

    python -m pipelines.bench download [--images 1000] [--repeats 2] [--processes 1] [--threads 32]

``download`` serves a sample world over the loopback server and measures, side by side in one run
(alternating which goes first, best of ``--repeats``), images/s of

- ``img2dataset.download`` alone on a parquet URL list of those images, and
- weft's whole download stage on the same images: read the source metadata (MMC4, LAION, CC-12M),
  dedup URLs, apply the host policy, img2dataset, the retry pass, the status table and the
  documents joined with their statuses;

and prints the ratio (stage / img2dataset).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipelines.download import DownloadConfig, download_documents, run_img2dataset  # noqa: E402
from pipelines.errors import BadRecordLog  # noqa: E402
from pipelines.hosts import HostPolicy  # noqa: E402
from pipelines.image_server import ImageServer  # noqa: E402
from pipelines.readers import read_source  # noqa: E402
from pipelines.sample_world.formats import write_metadata  # noqa: E402
from pipelines.sample_world.world import WorldConfig, generate_world  # noqa: E402


def bench_download(images: int, repeats: int, processes: int, threads: int, image_size: int) -> dict[str, float]:
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
                run_img2dataset(url_list, out, config, incremental_mode="incremental")  # out is fresh

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench")
    sub = parser.add_subparsers(dest="bench", required=True)
    download = sub.add_parser("download", help="the download stage vs img2dataset.download alone")
    download.add_argument("--images", type=int, default=1000)
    download.add_argument("--repeats", type=int, default=2)
    download.add_argument("--processes", type=int, default=1)
    download.add_argument("--threads", type=int, default=32)
    download.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    result = bench_download(args.images, args.repeats, args.processes, args.threads, args.image_size)
    print(f"images: {result['images']} ({args.image_size} px, processes={args.processes}, threads={args.threads}, "
          f"best of {args.repeats})")
    print(f"img2dataset.download alone: {result['img2dataset_images_per_s']:8.1f} images/s ({result['img2dataset_s']:.2f} s)")
    print(f"weft download stage:        {result['stage_images_per_s']:8.1f} images/s ({result['stage_s']:.2f} s)")
    print(f"ratio stage / img2dataset:  {result['stage_images_per_s'] / result['img2dataset_images_per_s']:.3f}")


if __name__ == "__main__":
    main()
