"""Packing with loss on the answers only: instruction documents through tokenization, packing, the shards and the
loader into the model's ``labels`` and ``image_loss_mask``; pretraining sequences stay as they were."""

import functools
import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.batch import encode_document
from pipelines.data.documents import image_element, make_document, text_element
from pipelines.data.instructions import ImageFolder, read_instructions
from pipelines.data.loader import NOT_TRAINED, collate_sequences, sequence_dataset
from pipelines.data.packing import PackingConfig, pack_documents, pack_tokenized, tokenize_documents
from pipelines.data.shards import write_shards
from pipelines.data.tokenizer import token_ids, train_tokenizer
from pipelines.sample_world.documents import world_texts
from pipelines.sample_world.instructions import InstructionConfig, write_instructions
from pipelines.sample_world.world import WorldConfig, generate_world

N = 4  # image placeholders per image
CONFIG = PackingConfig(max_length=64, num_image_tokens=N, seed=0)
QUESTION, ANSWER = "What colour is the triangle?", "red"


@functools.lru_cache(maxsize=1)
def tokenizer():
    return train_tokenizer(world_texts(generate_world(WorldConfig(seed=0, n_pairs=40, n_stories=6))))


def _jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


IMAGES = {"scene": _jpeg((200, 20, 20)), "labels": _jpeg((0, 0, 0)), "story": _jpeg((20, 20, 200))}


def _image(key: str, role: str | None = None) -> dict:
    element = image_element(f"http://x/{key}.jpg")
    element.update(key=key, status="ok")
    return element if role is None else {**element, "role": role}


def _text(text: str, role: str) -> dict:
    return {**text_element(text), "role": role}


def vqa(doc_id="vqa"):
    return make_document(doc_id=doc_id, source="test", kind="instruction", elements=[
        _image("scene", "instruction"), _text(QUESTION, "instruction"), _text(ANSWER, "answer")])


def seg_to_image(doc_id="seg"):
    return make_document(doc_id=doc_id, source="test", kind="instruction", elements=[
        _image("labels", "instruction"), _image("scene", "answer")])


def story(doc_id="story"):
    return make_document(doc_id=doc_id, source="test", kind="interleaved", elements=[
        _image("story"), text_element("a red circle at the top.", 0), text_element("then it turns blue.", 1)])


def _load(sequences, tmp_path, image_size=(16, 16)):
    """The sequences written as shards and read back through the loader, collated into one batch."""
    ids = token_ids(tokenizer())
    write_shards((s.to_sample(f"seq{i:04d}") for i, s in enumerate(sequences)), tmp_path, maxcount=100)
    samples = list(sequence_dataset([str(p) for p in sorted(tmp_path.glob("*.tar"))], image_size=image_size,
                                    shuffle_buffer=1))
    return collate_sequences(samples, pad_token_id=ids.pad, pad_to=CONFIG.max_length)


def test_a_vqa_item_trains_on_its_answer_and_end_only(tmp_path):
    tok = tokenizer()
    ids = token_ids(tok)
    (sequence,) = pack_documents([vqa(), seg_to_image()], tok, CONFIG, images=IMAGES)
    batch = _load([sequence], tmp_path)
    row, labels = batch.input_ids[0], batch.labels[0]
    question = tok(QUESTION, add_special_tokens=False)["input_ids"]
    answer = tok(f" {ANSWER}", add_special_tokens=False)["input_ids"]
    # the prompt is exactly what generation encodes for the eval's [image, question]; the answer follows after a space
    prompt, _ = encode_document(tok, [Image.new("RGB", (16, 16)), QUESTION], ids.boi, ids.image, N, (16, 16),
                                add_eos=False)
    vqa_length = len(prompt) + len(answer) + 1
    assert row[:vqa_length].tolist() == prompt + answer + [ids.eos]
    untrained = list(range(len(prompt)))  # <s>, <BoI>, the placeholders and the question's tokens
    assert (labels[untrained] == NOT_TRAINED).all()
    assert labels[len(prompt): vqa_length].tolist() == answer + [ids.eos]
    assert len(question) == len(prompt) - 2 - N
    # seg-to-image: <s>, the label map's block and the scene's placeholders untrained; the scene's <BoI> and </s> trained
    seg = labels[vqa_length: vqa_length + 2 * (N + 1) + 2].tolist()
    assert seg[0] == NOT_TRAINED and seg[1: N + 2] == [NOT_TRAINED] * (N + 1)
    assert seg[N + 2] == ids.boi and seg[N + 3: 2 * N + 3] == [NOT_TRAINED] * N and seg[-1] == ids.eos
    assert (labels[vqa_length + 2 * (N + 1) + 2:] == NOT_TRAINED).all()  # padding
    # image loss only for the image the answer draws
    assert batch.image_loss_mask.tolist() == [False, False, True]


def test_instruction_and_pretraining_documents_share_a_sequence(tmp_path):
    tok = tokenizer()
    ids = token_ids(tok)
    (sequence,) = pack_documents([story(), vqa()], tok, CONFIG, images=IMAGES)
    assert sequence.kinds == ["interleaved", "instruction"]
    batch = _load([sequence], tmp_path)
    story_length = int(sequence.cu_seqlens[1])
    story_ids = batch.input_ids[0, :story_length]
    assert batch.labels[0, :story_length].tolist() == story_ids.tolist()  # the model's defaults: every token
    assert batch.image_loss_mask.tolist() == [True, False]
    assert int((batch.labels[0, story_length:] != NOT_TRAINED).sum()) == len(tok(f" {ANSWER}")["input_ids"]) + 1
    assert ids.eos in batch.labels[0, story_length:].tolist()


def test_pretraining_sequences_carry_no_masks_and_the_model_defaults_apply(tmp_path):
    tok = tokenizer()
    (sequence,) = pack_documents([story(), story("story2")], tok, CONFIG, images=IMAGES)
    sample = sequence.to_sample("k")
    assert sequence.loss_mask is None and "loss_mask.npy" not in sample
    assert list(sample["json"]) == ["doc_ids", "parts", "offsets", "kinds", "sources", "num_images", "image_ext"]
    batch = _load([sequence], tmp_path)
    assert batch.labels is None and batch.image_loss_mask is None


def _conversation(rounds: int, doc_id: str = "chat"):
    elements = [_image("scene", "instruction")]
    for k in range(rounds):
        elements += [_text(f"Where is the red circle number {k}?", "instruction"),
                     _text("at the top left of the large blue square", "answer")]
    return make_document(doc_id=doc_id, source="test", kind="instruction", elements=elements)


def test_a_long_conversation_is_split_between_rounds_with_its_mask_aligned():
    tok = tokenizer()
    ids = token_ids(tok)
    (whole,) = tokenize_documents([_conversation(6)], tok, CONFIG, images=IMAGES)
    assert len(whole.tokens) > 2 * CONFIG.max_length
    sequences = list(pack_tokenized([whole], CONFIG))
    assert len(sequences) > 2
    mask = np.concatenate([s.loss_mask for s in sequences])
    assert mask.tolist() == whole.loss_mask.tolist()
    question = tok(" Where", add_special_tokens=False)["input_ids"][0]
    for s in sequences[1:]:  # every later part starts with a question (untrained), never inside an answer
        assert s.parts[0] > 0 and int(s.input_ids[0]) == question and s.loss_mask[0] == 0
    assert [bool(f) for s in sequences for f in s.image_trained] == [False]
    assert sequences[-1].loss_mask[-1] == 1 and int(sequences[-1].input_ids[-1]) == ids.eos


def test_an_instruction_document_without_its_image_is_skipped_and_reported():
    seen = []
    documents = [vqa(), vqa("other")]
    documents[1]["elements"][0]["key"] = "gone"
    (sequence,) = pack_documents(documents, tokenizer(), CONFIG, images=IMAGES, handler=seen.append)
    assert sequence.doc_ids == ["vqa"]
    assert [(r.file, r.line) for r in seen] == [("other", 0)] and "image not available" in seen[0].reason


def test_the_sample_worlds_items_load_as_the_model_reads_them(tmp_path):
    world = generate_world(WorldConfig(seed=1, n_pairs=4, n_stories=1, n_eval=2))
    path = write_instructions(world, tmp_path / "raw", InstructionConfig(vqa_per_image=2))
    documents = read_instructions(path, path.parent)
    config = PackingConfig(max_length=160, num_image_tokens=N, seed=0)
    sequences = list(pack_documents(documents, tokenizer(), config, images=ImageFolder(path.parent)))
    samples = [s.to_sample(f"s{i}", ["png" if data.startswith(b"\x89PNG") else "jpg" for data in s.images])
               for i, s in enumerate(sequences)]
    write_shards(samples, tmp_path / "shards", maxcount=100)
    loaded = list(sequence_dataset([str(p) for p in sorted((tmp_path / "shards").glob("*.tar"))], image_size=(32, 32),
                                   shuffle_buffer=1))
    batch = collate_sequences(loaded, pad_token_id=token_ids(tokenizer()).pad)
    assert batch.images.shape[0] == sum(len(s.images) for s in sequences) == int(batch.image_loss_mask.numel())
    assert int(batch.image_loss_mask.sum()) == sum(s.image_trained.count(True) for s in sequences) > 0
    trained = batch.labels != NOT_TRAINED
    assert 0 < int(trained.sum()) < int((batch.document_ids >= 0).sum()) // 2


def test_not_trained_is_the_models_ignore_index():
    from model.mm_interleaved import IGNORE_INDEX

    assert NOT_TRAINED == IGNORE_INDEX


@pytest.mark.parametrize("exts", [["jpg", "png"], ["jpg"]])
def test_per_image_extensions_are_checked(exts):
    (sequence,) = pack_documents([seg_to_image()], tokenizer(), CONFIG, images=IMAGES)
    if len(exts) != len(sequence.images):
        with pytest.raises(ValueError, match="1 image extensions for 2 images"):
            sequence.to_sample("k", exts)
        return
    sample = sequence.to_sample("k", exts)
    assert sample["json"]["image_exts"] == exts and "000.jpg" in sample and "001.png" in sample
    assert torch.equal(torch.from_numpy(sample["loss_mask.npy"]), torch.from_numpy(sequence.loss_mask))
