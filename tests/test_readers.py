"""Source readers on files written here, with malformed records mixed in: exact counts and reports."""

import json
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data.documents import image_elements, read_documents, write_documents
from pipelines.data.errors import BadRecordError, BadRecordLog, ShardError, reraise
from pipelines.data.filtering import FilterConfig, FilterReport, filter_documents
from pipelines.data.layout import DataLayout
from pipelines.data.readers import read_cc12m_tsv, read_mmc4, read_pairs_parquet, read_source


def mmc4_doc(i, n_images=2):
    return {
        "url": f"https://example.com/page{i}",
        "text_list": [f"Sentence {k} of doc {i}." for k in range(3)],
        "image_info": [
            {"image_name": f"{i}_{j}.jpg", "raw_url": f"https://img.example.com/{i}/{j}.jpg",
             "matched_text_index": 2 - j, "matched_sim": 0.3, "face_detections": None}
            for j in range(n_images)
        ],
        "similarity_matrix": [[0.1, 0.2, 0.3] for _ in range(n_images)],
        "could_have_url_duplicate": 0,
    }


def mmc4_lines():
    bad_index = mmc4_doc(90)
    bad_index["image_info"][0]["matched_text_index"] = 7
    bad_url = mmc4_doc(91)
    bad_url["image_info"][1]["raw_url"] = "ftp://nope"
    bad_matrix = mmc4_doc(92)
    bad_matrix["similarity_matrix"] = [[0.1]]
    return [
        json.dumps(mmc4_doc(0)),
        "{not json",                       # line 2
        json.dumps(mmc4_doc(1, n_images=0)),
        json.dumps([1, 2]),                # line 4
        json.dumps(bad_index),             # line 5
        json.dumps({"text_list": "x", "image_info": []}),  # line 6
        json.dumps(bad_url),               # line 7
        "",                                # line 8
        json.dumps(bad_matrix),            # line 9
        json.dumps(mmc4_doc(2, n_images=1)),
    ]


EXPECTED_MMC4_ERRORS = [
    (2, "invalid JSON: Expecting property name enclosed in double quotes: column 2"),
    (4, "expected a JSON object, got list"),
    (6, "text_list must be a list of strings"),
    (8, "empty line"),
    (9, "similarity_matrix must be 2 x 3"),
]
EXPECTED_SKIPPED_IMAGES = {  # a bad image leaves its document: line -> meta["skipped_images"]
    5: [{"index": 0, "reason": "image_info[0]: matched_text_index 7 not in [0, 3)"}],
    7: [{"index": 1, "reason": "image_info[1]: invalid url 'ftp://nope'"}],
}


def check_mmc4(docs, log, label):
    assert [d["doc_id"] for d in docs] == [f"mmc4:docs_shard_0_v2:{line}" for line in (1, 3, 5, 7, 10)]
    assert {d["source_row"]: json.loads(d["meta"])["skipped_images"] for d in docs
            if "skipped_images" in json.loads(d["meta"])} == EXPECTED_SKIPPED_IMAGES
    assert log.count == len(EXPECTED_MMC4_ERRORS)
    for record, (line, reason) in zip(log.records, EXPECTED_MMC4_ERRORS):
        assert record.file == label and record.line == line and record.reason.startswith(reason), str(record)
    first = docs[0]
    types = [(e["type"], e["url"] or e["text"]) for e in first["elements"]]
    # image j is matched to sentence 2 - j and sits right before it
    assert types == [
        ("text", "Sentence 0 of doc 0."),
        ("image", "https://img.example.com/0/1.jpg"), ("text", "Sentence 1 of doc 0."),
        ("image", "https://img.example.com/0/0.jpg"), ("text", "Sentence 2 of doc 0."),
    ]
    assert first["page_url"] == "https://example.com/page0" and first["kind"] == "interleaved"
    assert json.loads(first["meta"])["similarity_matrix"] == [[0.1, 0.2, 0.3]] * 2
    assert [len(image_elements(d)) for d in docs] == [2, 0, 1, 1, 1]


def test_mmc4_jsonl(tmp_path):
    path = tmp_path / "docs_shard_0_v2.jsonl"
    path.write_text("\n".join(mmc4_lines()) + "\n")
    log = BadRecordLog()
    check_mmc4(list(read_mmc4(path, log)), log, "docs_shard_0_v2.jsonl")


def test_mmc4_jsonl_zip_as_released(tmp_path):
    path = tmp_path / "docs_shard_0_v2.jsonl.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("docs_shard_0_v2.jsonl", "\n".join(mmc4_lines()) + "\n")
    log = BadRecordLog()
    check_mmc4(list(read_source(path, log)), log, "docs_shard_0_v2.jsonl.zip/docs_shard_0_v2.jsonl")


def test_reraise_handler_stops_at_first_bad_line(tmp_path):
    path = tmp_path / "docs_shard_0_v2.jsonl"
    path.write_text("\n".join(mmc4_lines()) + "\n")
    with pytest.raises(BadRecordError, match=r"docs_shard_0_v2.jsonl:2: invalid JSON"):
        list(read_mmc4(path, reraise))


def test_laion_parquet_upper_case_columns_streamed(tmp_path):
    path = tmp_path / "part-00000.parquet"
    urls = [f"https://x.org/{i}.jpg" for i in range(10)]
    texts = [f"caption {i}" for i in range(10)]
    urls[3] = None
    urls[6] = "not a url"
    texts[8] = "   "
    pq.write_table(pa.table({"URL": urls, "TEXT": texts, "similarity": [0.3] * 10}), path, row_group_size=3)
    log = BadRecordLog()
    docs = list(read_pairs_parquet(path, log, batch_size=4))
    assert [d["source_row"] for d in docs] == [0, 1, 2, 4, 5, 7, 9]
    assert [(r.line, r.reason) for r in log.records] == [
        (3, "missing url"), (6, "invalid url 'not a url'"), (8, "missing caption")]
    pair = docs[0]
    assert pair["kind"] == "pair" and pair["doc_id"] == "laion:part-00000:0"
    assert [e["type"] for e in pair["elements"]] == ["image", "text"]
    assert pair["elements"][1]["text"] == "caption 0"
    assert pair["elements"][0]["matched_sim"] == 0.3 and json.loads(pair["meta"]) == {}


def test_pairs_parquet_lower_case_and_datacomp_columns(tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"url": ["https://a/1", "https://a/2"], "caption": ["one", "two"]}), plain)
    assert [d["elements"][1]["text"] for d in read_pairs_parquet(plain, reraise)] == ["one", "two"]

    datacomp = tmp_path / "datacomp.parquet"
    pq.write_table(pa.table({"uid": ["u1", "u2"], "url": ["https://a/1", "https://a/2"], "text": ["t1", "t2"],
                             "clip_b32_similarity_score": [0.3, 0.2]}), datacomp)
    docs = list(read_pairs_parquet(datacomp, reraise, source="datacomp"))
    assert [d["elements"][0]["source_id"] for d in docs] == ["u1", "u2"]
    assert docs[0]["doc_id"] == "datacomp:datacomp:0"

    custom = tmp_path / "custom.parquet"
    pq.write_table(pa.table({"link": ["https://a/1"], "alt": ["x"]}), custom)
    with pytest.raises(ValueError, match="no url column"):
        list(read_pairs_parquet(custom))
    assert len(list(read_pairs_parquet(custom, url_col="link", caption_col="alt"))) == 1


CC12M_ROWS = [
    "https://a.com/1.jpg\ta dog",
    "https://a.com/2.jpg",                      # bad: one field
    "https://a.com/3.jpg\ta cat\tasleep",       # a tab in the caption: URLs never hold one
    "https://a.com/4.jpg\t",                    # bad: empty caption
    "",                                         # bad: empty line
    "javascript:alert(1)\tx",                   # bad: invalid url
    "https://a.com/7.jpg\t<PERSON> at a café",
]
CC12M_ERRORS = ["expected 2 tab-separated fields, got 1", "missing caption", "empty line",
                "invalid url 'javascript:alert(1)'"]


@pytest.mark.parametrize("header", [None, "url\tcaption", "caption\turl"])
def test_cc12m_tsv_with_and_without_header(tmp_path, header):
    rows = list(CC12M_ROWS)
    if header == "caption\turl":
        rows = ["\t".join(reversed(r.split("\t", 1))) if "\t" in r else r for r in rows]
    lines = ([header] if header else []) + rows
    path = tmp_path / "cc12m.tsv"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\tbroken\n")
    log = BadRecordLog()
    docs = list(read_cc12m_tsv(path, log))
    offset = 1 if header else 0
    assert [(d["elements"][0]["url"], d["elements"][1]["text"]) for d in docs] == [
        ("https://a.com/1.jpg", "a dog"), ("https://a.com/3.jpg", "a cat\tasleep"),
        ("https://a.com/7.jpg", "<PERSON> at a café")]
    assert [d["source_row"] for d in docs] == [1 + offset, 3 + offset, 7 + offset]
    assert [r.line for r in log.records] == [2 + offset, 4 + offset, 5 + offset, 6 + offset, 8 + offset]
    assert [r.reason for r in log.records] == CC12M_ERRORS + ["not valid UTF-8"]


def test_cc12m_forced_no_header_reports_header_line(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("url\tcaption\nhttps://a.com/1.jpg\tx\n")
    log = BadRecordLog()
    assert len(list(read_cc12m_tsv(path, log, header=False))) == 1
    assert [(r.line, r.reason) for r in log.records] == [(1, "invalid url 'url'")]


def test_mmc4_lone_surrogate_escapes_become_replacement_characters(tmp_path):
    doc = mmc4_doc(0)
    doc["text_list"][1] = "broken \ud800 emoji, whole \U0001f600"
    path = tmp_path / "docs_shard_0_v2.jsonl"
    path.write_text(json.dumps(doc) + "\n")  # ensure_ascii: the lone half is written as \\ud800
    assert "\\ud800" in path.read_text()
    docs = list(read_mmc4(path, reraise))
    texts = [e["text"] for e in docs[0]["elements"] if e["type"] == "text"]
    assert texts[1] == "broken \ufffd emoji, whole \U0001f600"
    assert write_documents(docs, tmp_path / "docs.parquet") == 1  # UTF-8 clean: parquet takes it


def test_documents_parquet_round_trip(tmp_path):
    path = tmp_path / "docs_shard_0_v2.jsonl"
    path.write_text("\n".join(mmc4_lines()) + "\n")
    docs = list(read_mmc4(path, BadRecordLog()))
    out = tmp_path / "out" / "docs.parquet"
    assert write_documents(docs, out, batch_size=2) == 5
    back = list(read_documents(out))
    for a, b in zip(docs, back):
        assert a["doc_id"] == b["doc_id"] and a["meta"] == b["meta"]
        assert [e["url"] or e["text"] for e in a["elements"]] == [e["url"] or e["text"] for e in b["elements"]]
        assert [e["matched_sim"] for e in a["elements"]] == pytest.approx(
            [e["matched_sim"] for e in b["elements"]], nan_ok=True)
    assert not list(out.parent.glob("*.tmp"))


# ------------------------------------------------------------------ files as they come (issue 14, items 4-8)


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_zip_members_are_read_whatever_their_name(tmp_path):
    """A re-hosted ``.jsonl.zip`` whose member is not named ``*.jsonl`` gave 0 documents and 0 errors."""
    lines = "\n".join(json.dumps(mmc4_doc(i)) for i in range(3)) + "\n"
    path = _zip(tmp_path / "docs_shard_7_v2.jsonl.zip", {"docs_shard_7_v2.json": lines})
    docs = list(read_source(path, reraise))
    assert [d["doc_id"] for d in docs] == [f"mmc4:docs_shard_7_v2.json:{i}" for i in (1, 2, 3)]
    empty = _zip(tmp_path / "docs_shard_8_v2.jsonl.zip", {"__MACOSX/._docs_shard_8_v2.jsonl": b"\x00\x05\x16\x07"})
    with pytest.raises(ShardError, match=r"docs_shard_8_v2.jsonl.zip: no document member"):
        list(read_source(empty, reraise))


def test_shard_n_zip_of_the_download_scripts_is_an_mmc4_shard(tmp_path):
    """``shard_N.zip`` (what a widely used MMC4 download script saves) was an unknown format, and the raw-shard
    listing skipped it without a word."""
    layout = DataLayout.at(str(tmp_path))
    (layout.raw / "mmc4").mkdir(parents=True)
    path = _zip(layout.raw / "mmc4" / "shard_12.zip", {"docs_shard_12_v2.jsonl": json.dumps(mmc4_doc(0)) + "\n"})
    assert len(list(read_source(path, reraise))) == 1
    assert layout.raw_partition_keys() == ["mmc4/shard_12.zip"]


def test_macos_resource_forks_in_a_zip_are_not_documents(tmp_path):
    """A zip made on a Mac carries ``__MACOSX/._<member>`` AppleDouble files: they were parsed as documents."""
    path = _zip(tmp_path / "docs_shard_0_v2.jsonl.zip", {
        "docs_shard_0_v2.jsonl": json.dumps(mmc4_doc(0)) + "\n" + json.dumps(mmc4_doc(1)) + "\n",
        "__MACOSX/._docs_shard_0_v2.jsonl": b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \n{}\n",
        "._docs_shard_0_v2.jsonl": b"\x00\x05\x16\x07",
        ".DS_Store": b"Bud1",
    })
    log = BadRecordLog()
    assert len(list(read_source(path, log))) == 2 and log.count == 0


def test_a_zip_that_is_not_a_zip_names_its_file(tmp_path):
    path = tmp_path / "docs_shard_9_v2.jsonl.zip"
    path.write_text(json.dumps(mmc4_doc(0)) + "\n")
    with pytest.raises(ShardError, match=r"^docs_shard_9_v2.jsonl.zip: not a zip archive"):
        list(read_source(path, reraise))


def test_truncated_parquet_names_its_file(tmp_path):
    path = tmp_path / "part-00003.parquet"
    pq.write_table(pa.table({"URL": [f"https://x.org/{i}.jpg" for i in range(50)], "TEXT": ["t"] * 50}), path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ShardError, match=r"^part-00003.parquet: not a readable parquet file"):
        list(read_source(path, reraise))


def test_one_bad_image_url_leaves_the_rest_of_its_document(tmp_path):
    """An image with an unusable URL dropped the whole MMC4 document, its text and its other images; a
    protocol-relative URL is resolved against the page it is on."""
    doc = mmc4_doc(0, n_images=3)
    doc["url"] = "https://news.example.org/story.html"
    doc["image_info"][0]["raw_url"] = "//cdn.example.org/a.jpg"
    doc["image_info"][1]["raw_url"] = "javascript:void(0)"
    path = tmp_path / "docs_shard_0_v2.jsonl"
    path.write_text(json.dumps(doc) + "\n")
    (kept,) = list(read_mmc4(path, reraise))
    assert [e["url"] for e in image_elements(kept)] == ["https://img.example.com/0/2.jpg",
                                                        "https://cdn.example.org/a.jpg"]
    assert [e["text"] for e in kept["elements"] if e["type"] == "text"] == doc["text_list"]
    assert json.loads(kept["meta"])["skipped_images"] == [
        {"index": 1, "reason": "image_info[1]: invalid url 'javascript:void(0)'"}]


def test_matched_sim_at_the_threshold_survives_a_parquet_round_trip(tmp_path):
    """matched_sim was stored as float32: 0.24 came back as 0.2399999946 and the image at the threshold, kept in
    memory, was dropped after the round trip."""
    doc = mmc4_doc(0, n_images=2)
    for info in doc["image_info"]:
        info["matched_sim"] = 0.24
    path = tmp_path / "docs_shard_0_v2.jsonl"
    path.write_text(json.dumps(doc) + "\n")
    config = FilterConfig(min_similarity=0.24, require_download=False, one_image_drop_fraction=0.0)
    in_memory = list(filter_documents(read_mmc4(path, reraise), config))
    write_documents(read_mmc4(path, reraise), tmp_path / "docs.parquet")
    report = FilterReport(config)
    round_trip = list(filter_documents(read_documents(tmp_path / "docs.parquet"), config, report=report))
    assert len(image_elements(in_memory[0])) == len(image_elements(round_trip[0])) == 2, report.drops


def test_laion_similarity_is_the_score_without_clip_scores(tmp_path):
    """LAION's own ``similarity`` was never used: without CLIP scores every LAION pair was dropped as "no
    similarity score" (MMC4 falls back to matched_sim)."""
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"URL": [f"https://x.org/{i}.jpg" for i in range(4)], "TEXT": ["a cat"] * 4,
                             "similarity": [0.35, 0.30, 0.20, None]}), path)
    config = FilterConfig(pair_min_similarity=0.28, require_download=False)
    report = FilterReport(config)
    kept = list(filter_documents(read_source(path, reraise), config, report=report))
    assert [d["source_row"] for d in kept] == [0, 1]
    assert [d.reason for d in report.drops if d.element_index is not None] == [
        "similarity 0.2000 < 0.28", "no similarity score"]


def test_byte_order_mark_and_trailing_blank_lines_are_not_bad_records(tmp_path):
    tsv = tmp_path / "cc12m.tsv"
    tsv.write_bytes("\ufeffurl\tcaption\r\nhttps://a.com/1.jpg\ta dog\r\n\r\n\n".encode())
    log = BadRecordLog()
    assert [d["elements"][1]["text"] for d in read_cc12m_tsv(tsv, log)] == ["a dog"] and log.count == 0
    jsonl = tmp_path / "docs_shard_0_v2.jsonl"
    jsonl.write_bytes("\ufeff".encode() + (json.dumps(mmc4_doc(0)) + "\n\n").encode())
    assert len(list(read_mmc4(jsonl, log))) == 1 and log.count == 0


def test_nan_in_meta_is_written_as_standard_json(tmp_path):
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"URL": ["https://x.org/1.jpg"], "TEXT": ["a cat"], "WIDTH": [float("nan")],
                             "pwatermark": [float("inf")]}), path)
    (doc,) = list(read_source(path, reraise))

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    assert json.loads(doc["meta"], parse_constant=refuse) == {"WIDTH": None, "pwatermark": None}


def test_json_error_reads_as_a_sentence(tmp_path):
    path = tmp_path / "docs_shard_0_v2.jsonl"
    path.write_text('{"text_list": ["unterminated}\n')
    log = BadRecordLog()
    assert not list(read_mmc4(path, log))
    assert log.reasons() == ["docs_shard_0_v2.jsonl:1: invalid JSON: Unterminated string starting at: column 16"]
