"""Dedup as a stage of the graph: a test set with known duplicate URLs, byte-identical copies behind other URLs and
re-encoded copies, across shards and sources, loses exactly those, each with its reason, and the counts are the
asset's metadata."""

import random

import dagster as dg
import pyarrow.parquet as pq
import pytest
from corpus_samples import Corpus, jpeg, photo

from assets.dedup import deduplicated_documents, deduplicated_documents_rate
from assets.io_manager import ManifestIOManager
from assets.partitions import source_shards
from assets.resources import QualityBounds, Storage
from pipelines.data.dedup import DedupConfig, DedupIndex, dedup_documents, shard_order
from pipelines.data.documents import make_document, text_element
from pipelines.data.image_hashes import HammingIndex, hamming, perceptual_hash

pytestmark = pytest.mark.filterwarnings("ignore::dagster.BetaWarning")


def test_hamming_index_finds_exactly_the_hashes_within_the_distance():
    rng = random.Random(0)
    stored = [rng.getrandbits(64) for _ in range(400)]
    for distance in (0, 1, 4, 9):
        index = HammingIndex(distance)
        for i, value in enumerate(stored):
            index.add(value, i)
        for query in stored[:50] + [v ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64)) for v in stored[:50]]:
            within = [(hamming(query, v), i) for i, v in enumerate(stored) if hamming(query, v) <= distance]
            expected = min(within) if within else None
            found = index.nearest(query)
            assert (None if found is None else (found[1], found[0])) == expected


class DuplicateCorpus(Corpus):
    """Three shards of three sources, and ``expected``: every image drop as ``(doc_id, url, rule)``."""

    def __init__(self):
        super().__init__(["mmc4/docs_shard_0_v2.jsonl.zip", "laion/part-00000.parquet", "cc12m/cc12m-00000.tsv"])
        self.expected: set[tuple[str, str, str]] = set()


def build_test_set() -> DuplicateCorpus:
    s = DuplicateCorpus()
    mmc4, laion, cc12m = s.documents
    photos = [jpeg(photo(i)) for i in range(12)]
    # MMC4 (deduplicated first): a story repeating its own image URL and one reusing another story's image URL
    s.documents[mmc4] += [
        make_document(doc_id="mmc4:a", source="mmc4", kind="interleaved", elements=[
            s.image("a0", photos[0]), text_element("First.", 0), s.image("a1", photos[1]), text_element("Then.", 1),
            s.image("a2", photos[0], url="https://img.example.org/a0.jpg"), text_element("Again.", 2)]),
        make_document(doc_id="mmc4:b", source="mmc4", kind="interleaved", elements=[
            s.image("b0", photos[1], url="https://img.example.org/a1.jpg"), text_element("Same picture.", 0),
            s.image("b1", photos[2]), text_element("New picture.", 1)]),
    ]
    s.expected |= {("mmc4:a", "https://img.example.org/a0.jpg", "duplicate_url"),
                   ("mmc4:b", "https://img.example.org/a1.jpg", "duplicate_url")}
    # LAION: an MMC4 image URL, the same bytes behind a new URL, re-encoded and resized copies, new pictures
    s.pair(laion, "laion:0", "l0", photos[3])
    s.pair(laion, "laion:1", "l1", photos[1], url="https://img.example.org/a1.jpg")
    s.pair(laion, "laion:2", "l2", photos[3], url="https://mirror.example.net/l0-copy.jpg")
    s.pair(laion, "laion:3", "l3", jpeg(photo(2), quality=75))
    s.pair(laion, "laion:4", "l4", jpeg(photo(4).resize((112, 112)), quality=85))
    s.pair(laion, "laion:5", "l5", photos[5])
    s.expected |= {("laion:1", "https://img.example.org/a1.jpg", "duplicate_url"),
                   ("laion:2", "https://mirror.example.net/l0-copy.jpg", "duplicate_image"),
                   ("laion:3", "https://img.example.org/l3.jpg", "near_duplicate_image")}
    # CC-12M: a re-encoded LAION picture, an MMC4 URL, new pictures
    s.pair(cc12m, "cc12m:0", "c0", jpeg(photo(5), quality=75))
    s.pair(cc12m, "cc12m:1", "c1", photos[2], url="https://img.example.org/b1.jpg")
    s.pair(cc12m, "cc12m:2", "c2", photos[6])
    s.pair(cc12m, "cc12m:3", "c3", jpeg(photo(4).resize((112, 112)), quality=85), url="https://img.example.org/c3.png")
    s.expected |= {("cc12m:0", "https://img.example.org/c0.jpg", "near_duplicate_image"),
                   ("cc12m:1", "https://img.example.org/b1.jpg", "duplicate_url"),
                   ("cc12m:3", "https://img.example.org/c3.png", "duplicate_image")}
    return s


def test_dedup_documents_drops_exactly_the_duplicates_in_shard_order():
    s = build_test_set()
    order = shard_order(s.documents, DedupConfig().source_priority)
    assert order == ["mmc4/docs_shard_0_v2.jsonl.zip", "laion/part-00000.parquet", "cc12m/cc12m-00000.tsv"]
    index, drops = DedupIndex(), []
    kept = [d for key in order for d in dedup_documents(s.documents[key], index, drops.append, images=s.images)]
    assert {(d.doc_id, d.url, d.rule) for d in drops if d.url} == s.expected
    pairs_dropped = {d.doc_id for d in drops if d.rule == "pair_without_image"}
    assert pairs_dropped == {doc for doc, _, _ in s.expected if not doc.startswith("mmc4")}
    assert [d["doc_id"] for d in kept] == ["mmc4:a", "mmc4:b", "laion:0", "laion:4", "laion:5", "cc12m:2"]
    assert [e["key"] for e in kept[0]["elements"] if e["type"] == "image"] == ["a0", "a1"]  # its text all stays
    assert len([e for e in kept[0]["elements"] if e["type"] == "text"]) == 3
    near = next(d for d in drops if d.doc_id == "laion:3")
    assert near.reason.startswith("perceptual hash") and "https://img.example.org/b1.jpg in mmc4:b" in near.reason
    exact_only = DedupIndex(DedupConfig(phash_max_distance=None))
    again = [d for key in order for d in dedup_documents(s.documents[key], exact_only, lambda d: None, images=s.images)]
    assert {"laion:3", "cc12m:0"} <= {d["doc_id"] for d in again}  # re-encoded copies pass without the pHash match
    assert perceptual_hash(s.images["l3"]) != perceptual_hash(s.images["b1"])  # they really are different bytes


def test_dedup_asset_removes_exactly_the_known_duplicates_with_counts_in_metadata(tmp_path):
    s = build_test_set()
    storage = Storage(root=str(tmp_path / "data"))
    s.write(storage.layout.root)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("source_shards", list(s.documents))
        upstream = [dg.AssetSpec(key, partitions_def=source_shards) for key in ("filtered_documents", "downloaded_images")]
        result = dg.materialize(
            [*upstream, deduplicated_documents, deduplicated_documents_rate], instance=instance,
            resources={"storage": storage, "io_manager": ManifestIOManager(storage=storage), "bounds": QualityBounds()})
    assert result.success
    (event,) = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    assert (metadata["images_in"], metadata["images_kept"]) == (15, 7)
    assert (metadata["documents_in"], metadata["documents_kept"]) == (12, 6)
    for rule, n in {"duplicate_url": 4, "duplicate_image": 2, "near_duplicate_image": 2, "pair_without_image": 6}.items():
        assert f"| {rule} | {n} |" in metadata["drops_by_rule"]
    (check,) = result.get_asset_check_evaluations()  # 8 of 15 images are duplicates: above the default bound of 0.5
    assert not check.passed and check.metadata["dedup_rate"].value == pytest.approx(8 / 15) == metadata["dedup_rate"]
    manifest = result.output_for_node("deduplicated_documents")
    drops = {(r["doc_id"], r["url"], r["rule"]) for m in manifest.shards.values()
             for r in pq.read_table(m.drops).to_pylist() if r["url"]}
    assert drops == s.expected
    hashes = [r for path in manifest.hashes.values() for r in pq.read_table(path).to_pylist()]
    assert len(hashes) == 7 and all(r["sha256"] and len(r["phash"]) == 16 for r in hashes)
