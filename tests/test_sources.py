"""Every source as released, written here in its own layout: OBELICS, OmniCorpus and MINT-1T parquets read to the
right interleaving, and a document of each source goes raw file -> normalized documents -> packed sequence and
decodes to its sentences joined by single spaces, images in the source's order."""

import json
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data.documents import image_elements, read_documents, write_documents
from pipelines.data.errors import BadRecordLog, reraise
from pipelines.data.packing import PackingConfig, pack_documents, unpack
from pipelines.data.readers import parquet_source, read_mint1t, read_obelics, read_omnicorpus, read_source
from pipelines.data.tokenizer import token_ids, train_tokenizer

PAGE = "https://blog.example.org/2019/05/garden.html"


def layout(document):
    """``[("text", sentence_index, text) | ("image", matched_text_index, url)]`` in element order."""
    return [(e["type"], e["sentence_index"], e["text"]) if e["type"] == "text" else
            (e["type"], e["matched_text_index"], e["url"]) for e in document["elements"]]


# --------------------------------------------------------------------------------- the layouts


def obelics_table(rows):
    """OBELICS' columns: ``images``/``texts`` lists, ``metadata`` and ``general_metadata`` as JSON strings."""
    return pa.table({
        "images": pa.array([r["images"] for r in rows], pa.list_(pa.string())),
        "metadata": [json.dumps(r["metadata"]) for r in rows],
        "general_metadata": [json.dumps(r["general"]) for r in rows],
        "texts": pa.array([r["texts"] for r in rows], pa.list_(pa.string())),
    })


OBELICS_ROW = {
    "images": ["https://img.example.org/a.jpg", None, "//cdn.example.org/b.png", None, None],
    "texts": [None, "Tomatoes like the sun.", None, "Water them at dawn.\n\nNever at noon.", "Harvest in August."],
    "metadata": [{"src": "https://img.example.org/a.jpg", "alt_text": "tomatoes", "original_width": 640}, None,
                 {"src": "//cdn.example.org/b.png", "alt_text": "", "original_width": 300}, None, None],
    "general": {"url": PAGE, "warc_filename": "crawl-data/CC-MAIN-2020-16/x.warc.gz", "warc_record_offset": 917,
                "warc_record_length": 4096},
}


def test_obelics_layout_reads_to_the_source_interleaving(tmp_path):
    path = tmp_path / "train-00000-of-01335-9a3b.parquet"
    broken = {**OBELICS_ROW, "texts": OBELICS_ROW["texts"][:-1]}  # lists of different lengths
    pq.write_table(obelics_table([OBELICS_ROW, broken]), path)
    log = BadRecordLog()
    (document,) = list(read_source(path, log, source="obelics"))
    assert layout(document) == [
        ("image", 0, "https://img.example.org/a.jpg"), ("text", 0, "Tomatoes like the sun."),
        ("image", 1, "https://cdn.example.org/b.png"), ("text", 1, "Water them at dawn.\n\nNever at noon."),
        ("text", 2, "Harvest in August."),
    ]
    assert document["doc_id"] == "obelics:train-00000-of-01335-9a3b:0" and document["page_url"] == PAGE
    meta = json.loads(document["meta"])
    assert [m["alt_text"] for m in meta["image_metadata"]] == ["tomatoes", ""]
    assert meta["warc_record_offset"] == 917 and "url" not in meta
    assert log.reasons() == [f"{path.name}:1: texts and images must be parallel lists, got 4 and 5 entries"]
    assert parquet_source(path) == "obelics"


def omnicorpus_table(rows, aligned=True):
    """OmniCorpus-CC's columns: ``general_metadata`` struct, ``images``/``texts`` lists, ``metadata`` list of
    per-image structs with perceptual hashes (aligned with the positions, or only the images)."""
    image_meta = pa.struct([("aesthetic_prob", pa.float64()), ("bytes", pa.int64()), ("d_hash", pa.string()),
                            ("d_hash_dup_count", pa.int64()), ("height", pa.int64()), ("img_url_sha", pa.string()),
                            ("p_hash", pa.string()), ("p_hash_dup_count", pa.int64()), ("unsafe_prob", pa.float64()),
                            ("width", pa.int64())])
    general = pa.struct([("domain", pa.list_(pa.string())), ("fluency_prob", pa.float64()), ("id", pa.string()),
                         ("non_advertisement_prob", pa.float64()), ("politics_prob", pa.float64()),
                         ("porn_prob", pa.float64()), ("toxic_prob", pa.float64()), ("url", pa.string())])

    def metadata(row):
        entries = [_omni_image(url) if url else None for url in row["images"]]
        return entries if aligned else [e for e in entries if e is not None]

    return pa.table({
        "general_metadata": pa.array([r["general"] for r in rows], general),
        "images": pa.array([r["images"] for r in rows], pa.list_(pa.string())),
        "texts": pa.array([r["texts"] for r in rows], pa.list_(pa.string())),
        "metadata": pa.array([metadata(r) for r in rows], pa.list_(image_meta)),
    })


def _omni_image(url):
    return {"aesthetic_prob": 0.6, "bytes": 20345, "d_hash": "f0e4c2d4d4f0e0c0", "d_hash_dup_count": 1, "height": 480,
            "img_url_sha": f"sha-{url[-5:]}", "p_hash": "d1c4ad35b1e6c2f0", "p_hash_dup_count": 1,
            "unsafe_prob": 0.01, "width": 640}


OMNI_ROW = {
    "general": {"domain": ["example.org"], "fluency_prob": 0.9, "id": "omni-42", "non_advertisement_prob": 0.8,
                "politics_prob": 0.0, "porn_prob": 0.0, "toxic_prob": 0.0, "url": PAGE},
    "images": [None, None, "https://img.example.org/c.jpg", None, "https://img.example.org/d.jpg"],
    "texts": ["Step one: dig.", "Step two: plant.", None, "Step three: wait.", None],
}


@pytest.mark.parametrize("aligned", [True, False], ids=["metadata by position", "metadata by image"])
def test_omnicorpus_layout_reads_to_the_source_interleaving(tmp_path, aligned):
    path = tmp_path / "0000.parquet"
    pq.write_table(omnicorpus_table([OMNI_ROW], aligned=aligned), path)
    (document,) = list(read_omnicorpus(path, reraise))
    assert layout(document) == [
        ("text", 0, "Step one: dig."), ("text", 1, "Step two: plant."), ("image", 2, "https://img.example.org/c.jpg"),
        ("text", 2, "Step three: wait."), ("image", 2, "https://img.example.org/d.jpg"),  # last: the text before it
    ]
    meta = json.loads(document["meta"])
    assert [m["img_url_sha"] for m in meta["image_metadata"]] == ["sha-c.jpg", "sha-d.jpg"]
    assert meta["image_metadata"][0]["p_hash"] == "d1c4ad35b1e6c2f0" and meta["id"] == "omni-42"
    assert document["page_url"] == PAGE and parquet_source(path) == "omnicorpus"


def mint1t_table(rows):
    """MINT-1T HTML's columns: ``texts``/``images`` lists, the page ``url``, ``cc_dump`` and image-order metadata."""
    return pa.table({
        "texts": pa.array([r["texts"] for r in rows], pa.list_(pa.string())),
        "images": pa.array([r["images"] for r in rows], pa.list_(pa.string())),
        "url": [r["url"] for r in rows],
        "cc_dump": ["CC-MAIN-2023-23"] * len(rows),
        "image_metadata": pa.array([[{"width": 800, "height": 600}] * sum(u is not None for u in r["images"])
                                    for r in rows], pa.list_(pa.struct([("width", pa.int64()),
                                                                        ("height", pa.int64())]))),
    })


MINT_ROW = {
    "texts": ["Our trip to Lisbon.", None, "The tram climbs the hill.", None, "Pasteis de nata, of course.", None],
    "images": [None, "https://img.example.org/e.jpg", None, "/f.jpg", None, "https://img.example.org/g.jpg"],
    "url": "https://travel.example.net/lisbon",
}


def test_mint1t_layout_reads_to_the_source_interleaving(tmp_path):
    path = tmp_path / "shard_0000.parquet"
    both = {**MINT_ROW, "images": ["https://img.example.org/x.jpg"] + MINT_ROW["images"][1:]}  # text and image at 0
    pq.write_table(mint1t_table([MINT_ROW, both]), path)
    log = BadRecordLog()
    (document,) = list(read_mint1t(path, log))
    assert layout(document) == [
        ("text", 0, "Our trip to Lisbon."), ("image", 1, "https://img.example.org/e.jpg"),
        ("text", 1, "The tram climbs the hill."), ("image", 2, "https://travel.example.net/f.jpg"),
        ("text", 2, "Pasteis de nata, of course."), ("image", 2, "https://img.example.org/g.jpg"),
    ]
    meta = json.loads(document["meta"])
    assert meta["cc_dump"] == "CC-MAIN-2023-23" and len(meta["image_metadata"]) == 3
    assert log.reasons() == [f"{path.name}:1: position 0 holds both a text and an image"]
    assert parquet_source(path) == "mint1t"


# ------------------------------------------------------------------------------- round trips


def _mmc4(tmp_path):
    record = {"url": PAGE, "text_list": ["It was time.", "Press the red button", "and wait for the café to open."],
              "image_info": [
                  {"image_name": "b.jpg", "raw_url": "https://img.example.org/b.jpg", "matched_text_index": 2,
                   "matched_sim": 0.3},
                  {"image_name": "a.jpg", "raw_url": "https://img.example.org/a.jpg", "matched_text_index": 0,
                   "matched_sim": 0.31}],
              "similarity_matrix": [[0.1, 0.2, 0.3], [0.31, 0.2, 0.1]], "could_have_url_duplicate": 0}
    path = tmp_path / "docs_shard_0_v2.jsonl.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("docs_shard_0_v2.jsonl", json.dumps(record) + "\n")
    # reading order: each image right before its matched sentence
    return path, record["text_list"], ["https://img.example.org/a.jpg", "https://img.example.org/b.jpg"]


def _laion(tmp_path):
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"URL": ["https://img.example.org/l.jpg"], "TEXT": ["A Red Kite over the Chilterns"],
                             "WIDTH": [512], "HEIGHT": [384], "similarity": [0.33]}), path)
    return path, ["a red kite over the chilterns"], ["https://img.example.org/l.jpg"]


def _cc12m(tmp_path):
    path = tmp_path / "cc12m.tsv"
    path.write_text("https://img.example.org/c.jpg\t<PERSON> Walking Her Dog in the Park\n")
    return path, ["<person> walking her dog in the park"], ["https://img.example.org/c.jpg"]


def _obelics(tmp_path):
    path = tmp_path / "train-00000-of-01335-9a3b.parquet"
    pq.write_table(obelics_table([OBELICS_ROW]), path)
    urls = ["https://img.example.org/a.jpg", "https://cdn.example.org/b.png"]
    return path, [t for t in OBELICS_ROW["texts"] if t], urls


def _omnicorpus(tmp_path):
    path = tmp_path / "0000.parquet"
    pq.write_table(omnicorpus_table([OMNI_ROW]), path)
    return path, [t for t in OMNI_ROW["texts"] if t], ["https://img.example.org/c.jpg", "https://img.example.org/d.jpg"]


def _mint1t(tmp_path):
    path = tmp_path / "shard_0000.parquet"
    pq.write_table(mint1t_table([MINT_ROW]), path)
    urls = ["https://img.example.org/e.jpg", "https://travel.example.net/f.jpg", "https://img.example.org/g.jpg"]
    return path, [t for t in MINT_ROW["texts"] if t], urls


SOURCES = {"mmc4": _mmc4, "laion": _laion, "cc12m": _cc12m, "obelics": _obelics, "omnicorpus": _omnicorpus,
           "mint1t": _mint1t}


@pytest.mark.parametrize("source", list(SOURCES))
def test_a_document_round_trips_from_raw_file_to_packed_sequence(tmp_path, source):
    """raw file -> normalized documents (parquet) -> packed sequence -> decoded text: the source's sentences joined
    by single spaces (pairs lower-cased, as packing lower-cases captions), its images in the source's order."""
    raw, sentences, urls = SOURCES[source](tmp_path)
    write_documents(read_source(raw, reraise, source=source), tmp_path / "documents.parquet")
    (document,) = list(read_documents(tmp_path / "documents.parquet"))
    assert [e["url"] for e in image_elements(document)] == urls
    tokenizer = train_tokenizer(["It was time.", "Step one: dig.", "a red kite"], vocab_size=300)
    ids = token_ids(tokenizer)
    images = {url: f"image {i}".encode() for i, url in enumerate(urls)}
    sequences = list(pack_documents([document], tokenizer, PackingConfig(max_length=512, num_image_tokens=4),
                                    images=images))
    assert len(sequences) == 1
    ((tokens, packed_images),) = unpack(sequences, ids.boi).values()
    assert tokenizer.decode(tokens, skip_special_tokens=True) == " ".join(sentences)
    assert packed_images == [images[url] for url in urls]
    assert tokens.count(ids.boi) == len(urls)
