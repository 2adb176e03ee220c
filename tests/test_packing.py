import functools
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.data.documents import image_element, make_document, text_element
from pipelines.data.errors import BadRecordLog
from pipelines.data.packing import PackingConfig, PackingStats, pack_documents, pack_tokenized, tokenize_documents, unpack
from pipelines.data.tokenizer import token_ids, train_tokenizer
from pipelines.sample_world.documents import world_documents, world_images, world_texts
from pipelines.sample_world.world import WorldConfig, generate_world

WORDS = "a the red blue green small large circle square triangle moves turns to at left right top bottom center digit".split()


@functools.lru_cache(maxsize=1)
def tokenizer():
    return train_tokenizer(world_texts(generate_world(WorldConfig(seed=0, n_pairs=60, n_stories=10))))


def _document(draw_ints, doc_index, rng):
    """A random interleaved document: sentences of 0..80 words, 0..4 images per sentence."""
    n_sentences = draw_ints
    elements = []
    for s in range(n_sentences):
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 4])):
            key = f"d{doc_index}i{len(elements)}"
            element = image_element(f"http://x/{key}.jpg", matched_text_index=s)
            element.update(key=key, status="ok")
            elements.append(element)
        elements.append(text_element(" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 80))), s))
    return make_document(doc_id=f"doc{doc_index}", source="test", kind="interleaved", elements=elements)


def _check(sequences, tokenized, config, ids, stats):
    by_id = {doc.doc_id: doc for doc in tokenized}
    block = config.num_image_tokens + 1
    for seq in sequences:
        assert 0 < len(seq) <= config.max_length
        cu = seq.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == len(seq) and all(a < b for a, b in zip(cu, cu[1:]))
        assert len(seq.doc_ids) == len(seq.parts) == len(seq.offsets) == len(cu) - 1
        # no image is split: every <BoI> has its N placeholders right after it, inside its segment
        bois = np.flatnonzero(seq.input_ids == ids.boi)
        assert len(bois) == len(seq.images)
        assert int((seq.input_ids == ids.image).sum()) == len(bois) * config.num_image_tokens
        for position in bois:
            segment = np.searchsorted(cu, position, side="right") - 1
            assert position + block <= cu[segment + 1]
            assert (seq.input_ids[position + 1: position + block] == ids.image).all()
        # boundaries: <s> starts exactly the first parts, parts start at allowed breaks
        for d, (doc_id, part, offset) in enumerate(zip(seq.doc_ids, seq.parts, seq.offsets)):
            first = int(seq.input_ids[cu[d]])
            assert (first == ids.bos) == (part == 0) == (offset == 0)
            assert ids.eos not in seq.input_ids[cu[d]: cu[d + 1] - 1].tolist()
            if stats.forced_splits == 0:
                assert offset in by_id[doc_id].breaks
    # every token and image exactly once, in order
    rebuilt = unpack(sequences, ids.boi)
    assert set(rebuilt) == set(by_id)
    for doc_id, (tokens, images) in rebuilt.items():
        assert tokens == by_id[doc_id].tokens.tolist()
        assert images == by_id[doc_id].images


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    n_docs=st.integers(1, 12),
    max_length=st.integers(40, 400),
    num_image_tokens=st.integers(1, 24),
    after=st.sampled_from([0.0, 0.5, 1.0]),
    max_images=st.sampled_from([None, None, 1, 2, 3]),
)
def test_packing_properties(seed, n_docs, max_length, num_image_tokens, after, max_images):
    rng = random.Random(seed)
    documents = [_document(rng.randint(1, 8), i, rng) for i in range(n_docs)]
    images = {e["key"]: e["key"].encode() for d in documents for e in d["elements"] if e["type"] == "image"}
    config = PackingConfig(max_length=max_length, num_image_tokens=num_image_tokens, image_after_probability=after,
                           seed=seed, max_images_per_sequence=max_images)
    tok = tokenizer()
    ids = token_ids(tok)
    stats = PackingStats()
    tokenized = list(tokenize_documents(documents, tok, config, images=images, stats=stats))
    sequences = list(pack_tokenized(tokenized, config, stats=stats))
    _check(sequences, tokenized, config, ids, stats)
    if max_images is not None:
        assert max(len(s.images) for s in sequences) <= max_images
    assert stats.images == len(images) and stats.images_missing == 0
    assert sum(len(s) for s in sequences) == stats.tokens == sum(len(d.tokens) for d in tokenized)
    # the decoder's drawing examples: images with some of their document's text before them
    markup = {ids.bos, ids.boi, ids.image}
    assert stats.images_after_text == sum(any(t not in markup for t in d.tokens[:start])
                                          for d in tokenized for start in d.image_starts)
    # deterministic given the seed
    again = list(pack_documents(documents, tok, config, images=images))
    assert [s.input_ids.tolist() for s in again] == [s.input_ids.tolist() for s in sequences]
    assert [s.cu_seqlens.tolist() for s in again] == [s.cu_seqlens.tolist() for s in sequences]
    assert [s.images for s in again] == [s.images for s in sequences]


def test_world_documents_pack_into_2048():
    world = generate_world(WorldConfig(seed=1, n_pairs=60, n_stories=12))
    documents = world_documents(world)
    images = world_images(world)
    tok = tokenizer()
    ids = token_ids(tok)
    config = PackingConfig(seed=3)
    stats = PackingStats()
    tokenized = list(tokenize_documents(documents, tok, config, images=images, stats=stats))
    sequences = list(pack_tokenized(tokenized, config, stats=stats))
    _check(sequences, tokenized, config, ids, stats)
    assert stats.documents == len(documents) and stats.images == len(images)
    assert max(len(s) for s in sequences) <= 2048
    assert stats.padding_tokens / (stats.sequences * 2048) < 0.2  # greedy packing fills sequences
    # pairs: the caption is lowercased; the image is first about half of the time
    pair_docs = [d for d in tokenized if d.kind == "pair"]
    first = sum(d.tokens[1] == ids.boi for d in pair_docs)
    assert 0.25 < first / len(pair_docs) < 0.75


def test_image_placement_is_seeded_and_fair():
    tok = tokenizer()
    ids = token_ids(tok)
    elements = []
    for s in range(200):
        element = image_element(f"http://x/{s}.jpg", matched_text_index=s)
        element.update(key=str(s), status="ok")
        elements += [element, text_element(f"the red circle {s}", s)]
    document = make_document(doc_id="long", source="test", kind="interleaved", elements=elements)
    images = {str(s): str(s).encode() for s in range(200)}

    def placements(seed):
        doc = next(tokenize_documents([document], tok, PackingConfig(seed=seed), images=images))
        # for each sentence unit: does it start with <BoI> (image before its sentence)?
        starts = doc.breaks[:-1]
        return [doc.tokens[b + (1 if b == 0 else 0)] == ids.boi for b in starts]

    a, b = placements(0), placements(0)
    assert a == b
    assert 0.4 < sum(a) / len(a) < 0.6
    assert placements(1) != a


def test_long_sentence_is_cut_outside_images_and_missing_images_are_reported():
    tok = tokenizer()
    ids = token_ids(tok)
    big = make_document(doc_id="big", source="test", kind="interleaved", elements=[
        text_element(" ".join(["red"] * 300), 0)])
    image = image_element("http://x/gone.jpg", matched_text_index=0)
    image.update(key="gone", status="failed_to_download")
    with_missing = make_document(doc_id="m", source="test", kind="interleaved", elements=[image, text_element("a red circle", 0)])
    log = BadRecordLog()
    stats = PackingStats()
    config = PackingConfig(max_length=64, num_image_tokens=8)
    tokenized = list(tokenize_documents([big, with_missing], tok, config, images={}, stats=stats, handler=log))
    sequences = list(pack_tokenized(tokenized, config, stats=stats))
    _check(sequences, tokenized, config, ids, stats)
    assert stats.forced_splits > 0 and stats.split_documents == 1
    assert stats.images_missing == 1 and log.count == 1 and "failed_to_download" in log.records[0].reason


def _story(doc_id, images_per_sentence, words=3):
    """An interleaved document: per sentence, its images (keys ``doc_id/s/i``) then the sentence."""
    elements = []
    for s, count in enumerate(images_per_sentence):
        for i in range(count):
            element = image_element(f"http://x/{doc_id}/{s}/{i}.jpg", matched_text_index=s)
            element.update(key=f"{doc_id}/{s}/{i}", status="ok")
            elements.append(element)
        elements.append(text_element(" ".join(["red"] * words), s))
    return make_document(doc_id=doc_id, source="test", kind="interleaved", elements=elements)


def test_image_cap_moves_images_to_the_next_sequence_without_dropping_any():
    tok = tokenizer()
    ids = token_ids(tok)
    # a long story (5 sentences, 1 image each), then a short one with 2 images, then a pair
    documents = [_story("long", [1, 1, 1, 1, 1]), _story("short", [2, 0])]
    documents.append(make_document(doc_id="pair", source="test", kind="pair", elements=_story("p", [1])["elements"]))
    images = {e["key"]: e["key"].encode() for d in documents for e in d["elements"] if e["type"] == "image"}
    config = PackingConfig(max_length=2048, num_image_tokens=4, max_images_per_sequence=2)
    stats = PackingStats()
    tokenized = list(tokenize_documents(documents, tok, config, images=images, stats=stats))
    sequences = list(pack_tokenized(tokenized, config, stats=stats))
    _check(sequences, tokenized, config, ids, stats)
    # without the cap everything fits in one 2048-token sequence; with it: 2 + 2 + (1 + ...) images
    assert len(list(pack_tokenized(tokenized, PackingConfig(max_length=2048, num_image_tokens=4)))) == 1
    assert [len(s.images) for s in sequences] == [2, 2, 1, 2, 1]
    assert [s.doc_ids for s in sequences] == [["long"], ["long"], ["long"], ["short"], ["pair"]]
    assert [s.parts for s in sequences[:3]] == [[0], [1], [2]]
    assert stats.split_documents == 1 and stats.forced_splits == 0 and stats.images == 8


def test_image_cap_cuts_inside_a_unit_with_more_images_than_the_cap_before_a_boi():
    tok = tokenizer()
    ids = token_ids(tok)
    document = _story("crowded", [5])
    images = {e["key"]: e["key"].encode() for e in document["elements"] if e["type"] == "image"}
    config = PackingConfig(num_image_tokens=4, max_images_per_sequence=2, image_after_probability=0.0)
    stats = PackingStats()
    tokenized = list(tokenize_documents([document], tok, config, images=images, stats=stats))
    sequences = list(pack_tokenized(tokenized, config, stats=stats))
    _check(sequences, tokenized, config, ids, stats)
    assert [len(s.images) for s in sequences] == [2, 2, 1]
    assert all(int(s.input_ids[0]) in (ids.bos, ids.boi) for s in sequences)  # every cut falls before a <BoI>
    assert stats.forced_splits == 2


def test_image_token_names_come_from_the_caller():
    """The paper preset's tokenizer names its image tokens differently: pack_documents takes the names."""
    world = generate_world(WorldConfig(seed=0, n_pairs=20, n_stories=4))
    tok = train_tokenizer(world_texts(world), boi_token="<|beginofimage|>", image_token="<|image|>")
    documents, images = world_documents(world), world_images(world)
    config = PackingConfig(max_length=256, num_image_tokens=4)
    with pytest.raises(ValueError, match="lacks"):
        next(pack_documents(documents, tok, config, images=images))
    sequences = list(pack_documents(documents, tok, config, images=images,
                                    boi_token="<|beginofimage|>", image_token="<|image|>"))
    boi, image = tok.convert_tokens_to_ids(["<|beginofimage|>", "<|image|>"])
    assert sum(int((s.input_ids == boi).sum()) for s in sequences) == len(images)
    assert sum(int((s.input_ids == image).sum()) for s in sequences) == 4 * len(images)
    assert sum(len(s.images) for s in sequences) == len(images)


def test_config_is_checked():
    with pytest.raises(ValueError):
        PackingConfig(max_length=10, num_image_tokens=64)
    with pytest.raises(ValueError, match="max_images_per_sequence"):
        PackingConfig(max_images_per_sequence=0)


def test_interleaved_sentences_are_joined_by_one_space():
    """MMC4 sentences come without their separating whitespace; packing joins them with one space, as the public
    MM-Interleaved and OpenFlamingo loaders do (not "time.Press")."""
    sentences = ["It was time.", "Press the red button", "and wait."]
    image = image_element("http://x/a.jpg", matched_text_index=1)
    image.update(key="a", status="ok")
    document = make_document(doc_id="glued", source="mmc4", kind="interleaved",
                             elements=[text_element(sentences[0], 0), image, text_element(sentences[1], 1),
                                       text_element(sentences[2], 2)])
    tok = tokenizer()
    ids = token_ids(tok)
    (sequence,) = pack_documents([document], tok, PackingConfig(max_length=96, num_image_tokens=4), images={"a": b"jpg"})
    assert tok.decode(sequence.input_ids.tolist(), skip_special_tokens=True) == " ".join(sentences)
    assert int((sequence.input_ids == ids.boi).sum()) == 1 and sequence.images == [b"jpg"]


@pytest.mark.parametrize("image_first", [0.0, 1.0])
def test_a_pair_trains_drawing_only_when_packed_caption_first(image_first):
    image = image_element("http://x/p.jpg")
    image.update(key="p", status="ok")
    pair = make_document(doc_id="p", source="laion", kind="pair", elements=[text_element("a red circle."), image])
    stats = PackingStats()
    list(tokenize_documents([pair], tokenizer(), PackingConfig(pair_image_first_probability=image_first),
                            images={"p": b"p"}, stats=stats))
    assert stats.images == 1 and stats.images_after_text == (1 if image_first == 0.0 else 0)
