"""Source readers on files written here, with malformed records mixed in: exact counts and reports."""

import json
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data.documents import image_elements, read_documents, write_documents
from pipelines.data.errors import BadRecordError, BadRecordLog, reraise
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
    (2, "invalid JSON"),
    (4, "expected a JSON object, got list"),
    (5, "image_info[0].matched_text_index 7 not in [0, 3)"),
    (6, "text_list must be a list of strings"),
    (7, "image_info[1]: invalid url 'ftp://nope'"),
    (8, "empty line"),
    (9, "similarity_matrix must be 2 x 3"),
]


def check_mmc4(docs, log, label):
    assert [d["doc_id"] for d in docs] == ["mmc4:docs_shard_0_v2:1", "mmc4:docs_shard_0_v2:3", "mmc4:docs_shard_0_v2:10"]
    assert log.count == len(EXPECTED_MMC4_ERRORS)
    for record, (line, reason) in zip(log.records, EXPECTED_MMC4_ERRORS):
        assert record.file == label and record.line == line and reason in record.reason, str(record)
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
    assert [len(image_elements(d)) for d in docs] == [2, 0, 1]


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
    assert json.loads(pair["meta"]) == {"similarity": 0.3}


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
    "https://a.com/3.jpg\ta cat\textra",        # bad: three fields
    "https://a.com/4.jpg\t",                    # bad: empty caption
    "",                                         # bad: empty line
    "javascript:alert(1)\tx",                   # bad: invalid url
    "https://a.com/7.jpg\t<PERSON> at a café",
]
CC12M_ERRORS = ["expected 2 tab-separated fields, got 1", "expected 2 tab-separated fields, got 3", "missing caption",
                "empty line", "invalid url 'javascript:alert(1)'"]


@pytest.mark.parametrize("header", [None, "url\tcaption", "caption\turl"])
def test_cc12m_tsv_with_and_without_header(tmp_path, header):
    rows = list(CC12M_ROWS)
    if header == "caption\turl":
        rows = ["\t".join(reversed(r.split("\t"))) if r.count("\t") == 1 else r for r in rows]
    lines = ([header] if header else []) + rows
    path = tmp_path / "cc12m.tsv"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\tbroken\n")
    log = BadRecordLog()
    docs = list(read_cc12m_tsv(path, log))
    offset = 1 if header else 0
    assert [(d["elements"][0]["url"], d["elements"][1]["text"]) for d in docs] == [
        ("https://a.com/1.jpg", "a dog"), ("https://a.com/7.jpg", "<PERSON> at a café")]
    assert [d["source_row"] for d in docs] == [1 + offset, 7 + offset]
    assert [r.line for r in log.records] == [2 + offset, 3 + offset, 4 + offset, 5 + offset, 6 + offset, 8 + offset]
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
    assert write_documents(docs, out, batch_size=2) == 3
    back = list(read_documents(out))
    for a, b in zip(docs, back):
        assert a["doc_id"] == b["doc_id"] and a["meta"] == b["meta"]
        assert [e["url"] or e["text"] for e in a["elements"]] == [e["url"] or e["text"] for e in b["elements"]]
        assert [e["matched_sim"] for e in a["elements"]] == pytest.approx(
            [e["matched_sim"] for e in b["elements"]], nan_ok=True)
    assert not list(out.parent.glob("*.tmp"))
