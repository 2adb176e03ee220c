"""The MMFS-augmented LLM: zero-init equivalence, causality across images and documents, KV cache."""

import pytest
import torch

from model.config import MMInterleavedConfig
from model.language import document_causal_mask, positions_in_document
from model.mm_interleaved import MMInterleaved, _GenerationState
from tiny_inputs import square_image, tiny_batch, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MMInterleaved.from_config(MMInterleavedConfig.tiny(), tiny_tokenizer())
    return m.eval()


def activate_mmfs(model, seed=1):
    """Non-zero gates and query-dependent logits/offsets, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.language.mmfs_blocks.values():
            block.gate.fill_(1.0)
            w = block.mmfs.attention_logits.weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.3)
            w = block.mmfs.sampling_offsets.weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.05)


def llm_inputs(model, batch):
    ids, docs = batch.input_ids, batch.document_ids
    b, t = ids.shape
    layout = model._layout(ids, docs)
    vision = model.vision(batch.images)
    positions = torch.arange(t).expand(b, t)
    embeds = model._embed(ids, layout, vision)
    mask = document_causal_mask(docs, positions, docs, positions, embeds.dtype)
    return embeds, mask, positions_in_document(docs), model._llm_context(docs, positions, layout, vision)


def test_mmfs_is_inserted_every_cross_attention_frequency_layers(model):
    assert model.language.mmfs_layers == [0, 2]
    assert all(float(b.gate.detach()) == 0.0 for b in model.language.mmfs_blocks.values())


def test_zero_gates_give_the_base_llm_logits(model):
    batch = tiny_batch(model)
    with torch.no_grad():
        embeds, mask, positions, context = llm_inputs(model, batch)
        ours = model.language(embeds, mask, positions, context).logits
        base = model.language.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    keep = torch.ones(ours.shape[-1], dtype=torch.bool)
    keep[[model.boi_token_id, model.image_token_id]] = False  # new tokens use their own head rows
    torch.testing.assert_close(ours[..., keep], base[..., keep], rtol=1e-5, atol=1e-5)


def test_nonzero_gates_change_the_logits(model):
    batch = tiny_batch(model)
    with torch.no_grad():
        embeds, mask, positions, context = llm_inputs(model, batch)
        before = model.language(embeds, mask, positions, context).logits
        activate_mmfs(model)
        _, _, _, context = llm_inputs(model, batch)
        after = model.language(embeds, mask, positions, context).logits
        for block in model.language.mmfs_blocks.values():
            block.gate.zero_()
    assert not torch.allclose(before, after, atol=1e-4)


def test_an_image_changes_only_later_tokens_of_its_own_document():
    torch.manual_seed(0)
    model = MMInterleaved.from_config(MMInterleavedConfig.tiny(), tiny_tokenizer()).eval()
    activate_mmfs(model)
    batch = tiny_batch(model, rows=2)
    layout = model._layout(batch.input_ids, batch.document_ids)
    target = 1  # second image of row 0's first document
    row, start = int(layout.row[target]), int(layout.boi_position[target]) + 1
    doc = int(layout.document[target])
    changed = batch.images.clone()
    changed[target] = square_image("yellow", changed.shape[-1], offset=-3)
    with torch.no_grad():
        base = model(batch).logits
        batch.images = changed
        new = model(batch).logits
    differs = (base - new).abs().amax(-1) > 1e-6  # (B, T)
    docs = batch.document_ids
    before = torch.arange(docs.shape[1]) < start
    assert not differs[row, before].any(), "a token before the image changed"
    assert not differs[row, docs[row] != doc].any(), "a token of another document changed"
    assert not differs[1 - row].any(), "a token of another row changed"
    after_text = (~before) & (docs[row] == doc) & (batch.input_ids[row] != model.image_token_id)
    assert differs[row, after_text].all(), "later text tokens of the document did not change"


def test_mmfs_alone_carries_image_information_to_later_tokens():
    # Visual tokens in the embeddings also carry the image; here they are identical, so any
    # change of later logits comes through MMFS only.
    torch.manual_seed(0)
    model = MMInterleaved.from_config(MMInterleavedConfig.tiny(), tiny_tokenizer()).eval()
    activate_mmfs(model)
    batch = tiny_batch(model, rows=1)
    with torch.no_grad():
        embeds, mask, positions, context = llm_inputs(model, batch)
        base = model.language(embeds, mask, positions, context).logits
        context.features.values[0, 0] += 1.0  # the first image's feature maps only
        new = model.language(embeds, mask, positions, context).logits
    layout = model._layout(batch.input_ids, batch.document_ids)
    start = int(layout.boi_position[0]) + 1
    differs = (base - new).abs().amax(-1)[0] > 1e-6
    assert not differs[:start].any()
    assert differs[start:][batch.document_ids[0, start:] == 0].all()
    assert not differs[batch.document_ids[0] == 1].any()


def test_cached_decoding_equals_uncached(model):
    activate_mmfs(model)
    try:
        batch = tiny_batch(model, rows=1)
        first_doc = batch.document_ids[0] == 0
        ids = batch.input_ids[0, first_doc].tolist()
        images = list(batch.images[:2])
        n = model.num_visual_tokens
        with torch.no_grad():
            full = model.language(*llm_inputs_single(model, ids, images)).logits[0]
            state = _GenerationState(model, ids[:3], [])
            cached, expected = [state.feed(0)], [full[2]]
            position = 3
            while position < len(ids):
                start = position
                if ids[position - 1] == model.boi_token_id:  # an image's placeholders go in at once
                    state.images.append(images[len(state.images)])
                    position += n
                else:
                    position += 1
                state.ids.extend(ids[start:position])
                cached.append(state.feed(start))
                expected.append(full[position - 1])
    finally:
        with torch.no_grad():
            for block in model.language.mmfs_blocks.values():
                block.gate.zero_()
    assert len(state.images) == 2
    torch.testing.assert_close(torch.stack(cached), torch.stack(expected), rtol=1e-4, atol=1e-4)


def llm_inputs_single(model, ids, images):
    from model.batch import InterleavedBatch

    batch = InterleavedBatch(torch.tensor([ids]), torch.zeros(1, len(ids), dtype=torch.long), torch.stack(images))
    return llm_inputs(model, batch)


def test_document_mask_and_positions():
    docs = torch.tensor([[0, 0, 1, 1, 1, -1]])
    pos = torch.arange(6)[None]
    allowed = document_causal_mask(docs, pos, docs, pos, torch.float32)[0, 0] == 0
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)
    assert positions_in_document(docs).tolist() == [[0, 1, 0, 1, 2, 0]]
