"""Smoke tests of the data benchmark's pieces at tiny sizes (no timing assertions)."""

import pytest

from pipelines.bench import (
    bench_loader,
    bench_packing,
    bench_text_encoders,
    main,
    mix_texts,
    mmc4_length_mix,
    sample_world_mix,
)
from pipelines.data.packing import PackingConfig
from pipelines.data.tokenizer import train_tokenizer
from pipelines.sample_world.documents import world_texts
from pipelines.sample_world.world import WorldConfig, generate_world


@pytest.fixture(scope="module")
def world_and_tokenizer():
    world = generate_world(WorldConfig(seed=0, n_pairs=30, n_stories=6))
    return world, train_tokenizer(world_texts(world))


def test_document_mixes(world_and_tokenizer):
    world, _ = world_and_tokenizer
    repeated = sample_world_mix(world, 2)
    assert len({d["doc_id"] for d in repeated}) == len(repeated) == 2 * 36
    long = mmc4_length_mix(world, 5, chars_per_doc=400, images_per_doc=3)
    keys = set(world.scenes())
    for document in long:
        texts = [e["text"] for e in document["elements"] if e["type"] == "text"]
        pictures = [e for e in document["elements"] if e["type"] == "image"]
        assert sum(map(len, texts)) >= 400 and len(pictures) == 3
        assert all(e["key"] in keys and e["status"] == "ok" for e in pictures)
        assert all(0 <= e["matched_text_index"] < len(texts) for e in pictures)


def test_bench_packing_and_text_encoders(world_and_tokenizer):
    world, tokenizer = world_and_tokenizer
    documents = mmc4_length_mix(world, 4, chars_per_doc=500, images_per_doc=2)
    result = bench_packing(documents, tokenizer, PackingConfig(max_length=256, num_image_tokens=4), repeats=1)
    assert result["documents"] == 4 and result["images"] == 8 and result["sequences"] >= 1
    assert result["tokens"] == result["text_tokens"] + 8 * 5 and 0 < result["fill"] <= 1
    encoders = bench_text_encoders(mix_texts(documents), tokenizer, repeats=1)  # raises if any way differs
    assert set(encoders) == {"one-by-one", "encode_batch_fast", "joined", "words-cold", "words-warm"}
    assert encoders["one-by-one"]["ratio"] == 1.0


def test_bench_loader_reads_back_every_sequence():
    result = bench_loader(pairs=20, stories=4, batch_size=4, image_size=16, num_image_tokens=4, repeats=1)
    assert result["samples"] >= 1 and result["samples_per_s"] > 0 and result["images_per_sample"] > 0


def test_command_line_packing(capsys):
    main(["packing", "--threads", "0", "--pairs", "20", "--stories", "4", "--repeat-docs", "1",
          "--mmc4-docs", "3", "--mmc4-chars", "300", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "[sample-world]" in out and "[mmc4-length]" in out and "words-warm" in out


def test_speed_bench_variants_train_the_same_model():
    """The CPU speed bench's variants differ only in arithmetic: same weights, batch and noise give the same first
    loss (threads exactly up to summation order, bf16 autocast within bf16's precision)."""
    from pipelines.training.speed_bench import VARIANTS, run

    eager = tuple(v for v in VARIANTS if not v.compiled)
    timings = run("tiny", steps=1, rows=1, variants=eager)
    losses = [t.first_loss for t in timings.values()]
    assert set(timings) == {v.name for v in eager} and all(t.median > 0 for t in timings.values())
    assert abs(losses[1] - losses[0]) < 1e-4 * abs(losses[0])
    assert abs(losses[2] - losses[0]) < 0.05 * abs(losses[0])
