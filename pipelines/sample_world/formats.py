"""Write the sample world as the real sources are released, with URLs on a given server.

- MMC4: ``docs_shard_{i}_v2.jsonl.zip`` (one ``.jsonl`` member) or plain ``.jsonl``.
- LAION: ``part-{i:05d}.parquet`` with ``URL``, ``TEXT``, ``WIDTH``, ``HEIGHT``, ``similarity``.
- CC-12M: ``cc12m-{i:05d}.tsv``, ``url<TAB>caption``, no header (as released).
- ``ground_truth.jsonl`` (one line per image: scene, true caption, text shown, mismatch label)
  and ``eval/<split>.jsonl`` for the held-out splits.
- With an :class:`~pipelines.sample_world.instructions.InstructionConfig`: ``instructions/``, LLaVA-style
  instruction data on the training images (:mod:`pipelines.sample_world.instructions`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.files import atomic_path, write_text
from pipelines.sample_world.instructions import InstructionConfig, write_instructions
from pipelines.sample_world.world import SampleWorld, image_path


@dataclass(frozen=True)
class ShardSizes:
    """How the world's metadata is cut into raw shards."""

    docs_per_shard: int = 16
    """MMC4 documents per jsonl(.zip) shard."""
    rows_per_shard: int = 100
    """Pairs per LAION parquet / CC-12M tsv shard."""


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def mmc4_records(world: SampleWorld, base_url: str) -> list[dict]:
    records = []
    for story in world.stories:
        n_sentences = len(story.sentences)
        records.append({
            "url": f"https://stories.example/{story.story_id}.html",
            "text_list": story.sentences,
            "image_info": [
                {
                    "image_name": f"{image.image_id}.jpg",
                    "raw_url": base_url + image_path(image.image_id),
                    "matched_text_index": image.matched_text_index,
                    "matched_sim": image.matched_sim,
                    "face_detections": None,
                }
                for image in story.images
            ],
            "similarity_matrix": [
                [image.matched_sim if k == image.matched_text_index else round(image.matched_sim * 0.5, 4)
                 for k in range(n_sentences)]
                for image in story.images
            ],
            "could_have_url_duplicate": 0,
        })
    return records


ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
"""The modification time of every member of the MMC4 zips (the earliest a zip can record)."""


def write_mmc4(world: SampleWorld, out_dir: str | os.PathLike, base_url: str, *,
               docs_per_shard: int = ShardSizes.docs_per_shard,
               zipped: bool = True) -> list[Path]:
    out = Path(out_dir) / "mmc4"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, chunk in enumerate(_chunks(mmc4_records(world, base_url), docs_per_shard)):
        member = f"docs_shard_{i}_v2.jsonl"
        data = "".join(json.dumps(r) + "\n" for r in chunk)
        if zipped:
            path = out / f"{member}.zip"
            with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                # a fixed timestamp (not the clock's): the same world gives the same bytes, hence the same data version
                info = zipfile.ZipInfo(member, date_time=ZIP_DATE_TIME)
                info.external_attr = 0o644 << 16
                archive.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
        else:
            path = write_text(out / member, data)
        paths.append(path)
    return paths


def _split_pairs(world: SampleWorld) -> tuple[list, list]:
    """Even pairs go to LAION, odd ones to CC-12M."""
    return world.pairs[0::2], world.pairs[1::2]


def write_laion(world: SampleWorld, out_dir: str | os.PathLike, base_url: str, *,
                rows_per_shard: int = ShardSizes.rows_per_shard) -> list[Path]:
    out = Path(out_dir) / "laion"
    out.mkdir(parents=True, exist_ok=True)
    size = world.config.image_size
    paths = []
    for i, chunk in enumerate(_chunks(_split_pairs(world)[0], rows_per_shard)):
        table = pa.table({
            "URL": [base_url + image_path(p.image_id) for p in chunk],
            "TEXT": [p.text for p in chunk],
            "WIDTH": pa.array([size] * len(chunk), pa.int32()),
            "HEIGHT": pa.array([size] * len(chunk), pa.int32()),
            "similarity": pa.array([p.similarity for p in chunk], pa.float64()),
        })
        path = out / f"part-{i:05d}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        paths.append(path)
    return paths


def write_cc12m(world: SampleWorld, out_dir: str | os.PathLike, base_url: str, *,
                rows_per_shard: int = ShardSizes.rows_per_shard) -> list[Path]:
    out = Path(out_dir) / "cc12m"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, chunk in enumerate(_chunks(_split_pairs(world)[1], rows_per_shard)):
        path = out / f"cc12m-{i:05d}.tsv"
        lines = "".join(f"{base_url + image_path(p.image_id)}\t{p.text}\n" for p in chunk)
        write_text(path, lines)
        paths.append(path)
    return paths


def ground_truth_records(world: SampleWorld, base_url: str) -> list[dict]:
    records = []
    laion, _ = _split_pairs(world)
    laion_ids = {p.image_id for p in laion}
    for p in world.pairs:
        records.append({
            "image_id": p.image_id, "url": base_url + image_path(p.image_id),
            "source": "laion" if p.image_id in laion_ids else "cc12m",
            "scene": p.scene.to_dict(), "caption": p.caption, "text": p.text, "text_kind": p.text_kind,
            "mismatched": p.mismatched,
        })
    for story in world.stories:
        for image in story.images:
            records.append({
                "image_id": image.image_id, "url": base_url + image_path(image.image_id), "source": "mmc4",
                "story_id": story.story_id, "scene": image.scene.to_dict(),
                "caption": story.sentences[image.matched_text_index],
                "text": story.sentences[image.matched_text_index],
                "text_kind": "mismatched" if image.mismatched else "story_sentence", "mismatched": image.mismatched,
            })
    return records


WORLD_CONFIG_FILE = "world.json"
"""Beside the eval splits: the ``WorldConfig`` that wrote them."""


def write_metadata(world: SampleWorld, out_dir: str | os.PathLike, base_url: str, *, mmc4_zipped: bool = True,
                   docs_per_shard: int = ShardSizes.docs_per_shard,
                   rows_per_shard: int = ShardSizes.rows_per_shard,
                   instructions: InstructionConfig | None = None) -> dict[str, list[Path]]:
    """Write all three source formats, the ground truth and the eval splits under ``out_dir`` (and, with
    ``instructions``, the instruction data)."""
    base_url = base_url.rstrip("/")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "mmc4": write_mmc4(world, out, base_url, docs_per_shard=docs_per_shard, zipped=mmc4_zipped),
        "laion": write_laion(world, out, base_url, rows_per_shard=rows_per_shard),
        "cc12m": write_cc12m(world, out, base_url, rows_per_shard=rows_per_shard),
    }
    truth = out / "ground_truth.jsonl"
    write_text(truth, "".join(json.dumps(r) + "\n" for r in ground_truth_records(world, base_url)))
    written["ground_truth"] = [truth]
    (out / "eval").mkdir(exist_ok=True)
    written["eval"] = []
    for name, records in world.eval_splits.items():
        path = out / "eval" / f"{name}.jsonl"
        write_text(path, "".join(json.dumps(r) + "\n" for r in records))
        written["eval"].append(path)
    # The eval prompts hold the world's images, regenerated from this config by whoever evaluates.
    write_text(out / "eval" / WORLD_CONFIG_FILE, json.dumps(dataclasses.asdict(world.config), indent=1))
    if instructions is not None:
        written["instructions"] = [write_instructions(world, out, instructions)]
    return written
