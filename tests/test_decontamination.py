"""Decontamination before packing: a training set seeded with evaluation images (re-encoded, resized, byte-identical)
and evaluation captions (verbatim, inside a longer text, as a pair's recaption) loses exactly those, the documents
around them keep the rest, and the evaluation report's lineage shows what was removed and why."""

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data.decontaminated_documents import decontaminate_shards
from pipelines.data.decontamination import Contamination, DecontaminationConfig, EvaluationSplits
from pipelines.data.dedup import DedupConfig
from pipelines.data.deduplicated_documents import dedup_shards
from pipelines.data.documents import make_document, read_documents, text_element
from pipelines.data.image_hashes import content_sha256, perceptual_hash
from pipelines.data.layout import DataLayout
from pipelines.data.packed_sequences import SequenceShards, pack_shards
from pipelines.data.packing import PackingConfig
from pipelines.data.recaption import CAPTION_FIELD
from pipelines.data.recaptions import RECAPTIONS_SCHEMA, RecaptionedShard
from pipelines.data.tokenizer import TokenizerManifest, token_ids, train_tokenizer
from pipelines.evaluation.evaluation_report import removed_from_training
from pipelines.evaluation.report import write_report
from pipelines.evaluation.run import EvaluationResult
from pipelines.evaluation.sample_world_tasks import TaskResult

from corpus_samples import Corpus, jpeg, photo

EVAL_CAPTIONS = [
    "A brown dog leaps over a wooden fence in the garden.",
    "Two children fly a red kite on a windy beach.",
    "An old man reads a newspaper on a park bench.",
    "A plate of pasta with tomato sauce and fresh basil leaves.",
    "A yellow taxi waits at a crossing in the rain at night.",
]
EVAL_QUESTION = "What colour is the taxi?"  # too short to tell: never matched


@dataclass(frozen=True)
class Benchmark:
    """An evaluation split: five images with one reference caption each, and a question."""

    def build(self) -> EvaluationSplits:
        images = [("captioning", f"e{i}", jpeg(photo(100 + i))) for i in range(5)]
        texts = [("captioning", f"e{i}", caption) for i, caption in enumerate(EVAL_CAPTIONS)]
        return EvaluationSplits.build("test benchmark", images, texts + [("vqa", "q0", EVAL_QUESTION)])


def test_text_match_takes_most_of_an_evaluation_texts_ngrams():
    contamination = Contamination(Benchmark().build(), DecontaminationConfig())
    assert contamination.text("A brown dog leaps over a wooden fence in the garden.") == \
        "100% of the 8-grams of captioning e0"
    assert contamination.text("Stock photo: two CHILDREN fly a red kite, on a windy beach! (2019)") is not None
    assert contamination.text("A brown dog leaps over a wooden fence.") is None  # 1 of its 4 8-grams
    assert contamination.text("A dog in the garden; a kite on a beach; pasta with basil.") is None
    assert contamination.text("what colour is the taxi") is None and contamination.texts_checked == 5


def seeded_training_set() -> tuple[Corpus, set[tuple[str, str]], dict[str, str]]:
    """Clean documents, and documents seeded with evaluation items: the expected removals ``(doc_id, rule)`` and a
    recaption that repeats an evaluation caption."""
    corpus = Corpus(["mmc4/docs_shard_0_v2.jsonl.zip", "laion/part-00000.parquet", "cc12m/cc12m-00000.tsv"])
    mmc4, laion, cc12m = corpus.documents
    for i in range(8):
        corpus.pair(laion, f"laion:{i}", f"l{i}", jpeg(photo(i)), caption=f"holiday snapshot number {i} from the album")
    corpus.pair(laion, "laion:e0", "le0", jpeg(photo(100), quality=75))                      # re-encoded
    corpus.pair(laion, "laion:e1", "le1", jpeg(photo(101).resize((112, 112)), quality=85))  # resized
    corpus.pair(cc12m, "cc12m:e2", "ce2", jpeg(photo(102)))                                  # the same bytes
    corpus.pair(laion, "laion:c3", "lc3", jpeg(photo(20)), caption=EVAL_CAPTIONS[3])
    corpus.pair(cc12m, "cc12m:c1", "cc1", jpeg(photo(21)), caption=f"Photo: {EVAL_CAPTIONS[1].lower()[:-1]} (stock)")
    corpus.pair(cc12m, "cc12m:r4", "cr4", jpeg(photo(22)), caption="IMG_2231.jpg")            # recaptioned as e4
    for i in range(3):
        corpus.pair(cc12m, f"cc12m:{i}", f"c{i}", jpeg(photo(30 + i)), caption=f"a quiet street, picture {i}")
    corpus.documents[mmc4] += [
        make_document(doc_id="mmc4:clean", source="mmc4", kind="interleaved", elements=[
            corpus.image("m0", jpeg(photo(40))), text_element("We walked to the lake.", 0),
            corpus.image("m1", jpeg(photo(41))), text_element("The water was cold.", 1)]),
        make_document(doc_id="mmc4:seeded", source="mmc4", kind="interleaved", elements=[
            corpus.image("m2", jpeg(photo(42))), text_element("Our day in town.", 0),
            corpus.image("m3", jpeg(photo(103), quality=80)), text_element(EVAL_CAPTIONS[2], 1),
            text_element("Then we went home.", 2)]),
    ]
    expected = {("laion:e0", "eval_image"), ("laion:e1", "eval_image"), ("cc12m:e2", "eval_image"),
                ("laion:c3", "eval_text"), ("cc12m:c1", "eval_text"), ("cc12m:r4", "eval_text"),
                ("mmc4:seeded", "eval_image"), ("mmc4:seeded", "eval_text")}
    expected |= {(doc, "pair_contaminated") for doc, _ in expected if not doc.startswith("mmc4")}
    return corpus, expected, {"cc12m:r4": EVAL_CAPTIONS[4]}


def test_seeded_evaluation_items_are_removed_before_packing_and_shown_in_the_report(tmp_path):
    corpus, expected, recaptioned = seeded_training_set()
    layout = DataLayout.at(str(tmp_path / "data"))
    filtered, downloads = corpus.write(layout.root)
    deduplicated = dedup_shards(filtered, downloads, DedupConfig(), layout)
    assert deduplicated.drops_by_rule == {}  # no seeded item is a duplicate of another
    recaptions_path = tmp_path / "recaptions.parquet"
    pq.write_table(pa.Table.from_pylist([{"doc_id": d, "element_index": 0, "key": "cr4", "caption": "IMG_2231.jpg",
                                          CAPTION_FIELD: c} for d, c in recaptioned.items()], schema=RECAPTIONS_SCHEMA),
                   recaptions_path)
    recaptions = {"cc12m/cc12m-00000.tsv": RecaptionedShard("cc12m", str(recaptions_path), 1, 1, "test")}
    clean = decontaminate_shards(deduplicated, recaptions, Benchmark(), DecontaminationConfig(), layout)

    drops = [r for m in clean.shards.values() for r in pq.read_table(m.drops).to_pylist()]
    assert {(r["doc_id"], r["rule"]) for r in drops} == expected
    assert clean.drops_by_rule == {"eval_image": 4, "eval_text": 4, "pair_contaminated": 6}
    reasons = {(r["doc_id"], r["rule"]): r["reason"] for r in drops}
    assert reasons[("laion:e1", "eval_image")].startswith("perceptual hash") and "captioning e1" in reasons[
        ("laion:e1", "eval_image")]
    assert reasons[("cc12m:e2", "eval_image")] == "same bytes (sha256) as captioning e2"
    assert reasons[("cc12m:r4", "eval_text")].endswith("(in its recaption, the text it is trained on)")
    kept = {d["doc_id"]: d for m in clean.shards.values() for d in read_documents(m.path)}
    assert len(kept) == 8 + 3 + 2 and not {doc for doc, _ in expected if not doc.startswith("mmc4")} & set(kept)
    seeded = kept["mmc4:seeded"]  # keeps its other image and its other sentences
    assert [e["key"] or e["text"] for e in seeded["elements"]] == ["m2", "Our day in town.", "Then we went home."]
    assert (clean.counts.images_in, clean.counts.images_kept) == (21, 14)  # 4 evaluation images, 3 with their pairs

    tokenizer = train_tokenizer(["holiday snapshot", "a quiet street", "We walked to the lake."], tmp_path / "tok")
    manifest = TokenizerManifest(str(tmp_path / "tok"), len(tokenizer), token_ids(tokenizer), "<BoI>", "<image>",
                                 {"kind": "test"})
    lineage = {"dedup": deduplicated.lineage(), "decontamination": clean.lineage()}
    packed = pack_shards(clean.shards, downloads, recaptions, manifest, PackingConfig(max_length=256, num_image_tokens=4),
                         SequenceShards(), layout, lineage=lineage)
    assert packed.stats.documents == 13
    rows = removed_from_training(packed.path)
    assert rows["decontamination"]["removed"] == {"eval_image": 4, "eval_text": 4, "pair_contaminated": 6}
    assert rows["decontamination"]["checked against"]["name"] == "test benchmark"
    result = EvaluationResult("model", 1, [TaskResult("captioning", {"cider": [0.5, 0.7]}, 2)])
    report = write_report(tmp_path / "report", {"trained": result}, lineage=rows)
    text = (report / "report.md").read_text()
    assert '| decontamination | {"checked against": {"name": "test benchmark"' in text
    assert '"removed": {"eval_image": 4, "eval_text": 4, "pair_contaminated": 6}' in text
    assert "mmc4:seeded: eval_text: 100% of the 8-grams of captioning e2" in text  # why, for the first removals


@pytest.mark.parametrize("distance", [None, 4])
def test_image_match_without_perceptual_hash_takes_only_identical_bytes(distance):
    contamination = Contamination(Benchmark().build(), DecontaminationConfig(image_max_distance=distance))
    reencoded = jpeg(photo(100), quality=75)
    identical = jpeg(photo(100))
    assert contamination.image(content_sha256(identical), perceptual_hash(identical)) is not None
    assert (contamination.image(content_sha256(reencoded), perceptual_hash(reencoded)) is not None) == (distance == 4)
