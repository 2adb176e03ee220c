"""What the model does to fit the paper's scale: gradient checkpointing, UNet micro-batches and a UNet MMFS that
reads only the images each generated image can see. Each changes memory, never the numbers."""

import dataclasses

import pytest
import torch

from model.batch import InterleavedBatch, encode_document
from model.condition import Condition
from model.config import MMInterleavedConfig, ResamplerConfig
from model.image_decoder import DecoderContext
from model.mm_interleaved import MMInterleaved
from model.mmfs import MMFS, ImageFeatures
from tiny_inputs import square_image, tiny_batch, tiny_tokenizer


def build(config: MMInterleavedConfig, state: dict | None = None) -> MMInterleaved:
    """A tiny model with live MMFS everywhere, ``state``'s weights if given: open gates, moved zero convolutions, and
    offsets and attention logits that depend on the query (so on each image's relative position), as after training."""
    torch.manual_seed(0)
    model = MMInterleaved.from_config(config, tiny_tokenizer()).train()
    if state is not None:
        model.load_state_dict(state)
        return model
    with torch.no_grad():
        for block in model.language.mmfs_blocks.values():
            block.gate.fill_(0.5)
        for block in [*model.decoder.skip_mmfs, model.decoder.mid_mmfs]:
            torch.nn.init.normal_(block.zero_conv.weight, std=0.1)
            torch.nn.init.normal_(block.mmfs.output_proj.bias, std=0.1)
        for mmfs in (m for m in model.modules() if isinstance(m, MMFS)):
            torch.nn.init.normal_(mmfs.sampling_offsets.weight, std=0.05)
            torch.nn.init.normal_(mmfs.attention_logits.weight, std=0.5)
            torch.nn.init.normal_(mmfs.relative_position.weight, std=1.0)
    return model


def loss_and_grads(model: MMInterleaved, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's loss and gradients; noise, timesteps and condition dropout drawn from seed 0."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = model(batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(expected, got) -> None:
    """Same loss and gradients up to float32 rounding (another batch size or order of a sum: ~1e-6 of a gradient's
    largest element)."""
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    assert got[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)


@pytest.fixture(scope="module")
def reference():
    """The tiny model without any memory option, its batch and its step."""
    model = build(MMInterleavedConfig.tiny())
    batch = tiny_batch(model)
    return model, batch, loss_and_grads(model, batch)


@pytest.mark.parametrize("condition", [None, ResamplerConfig(num_queries=7, hidden_size=32, num_layers=2, num_heads=2)],
                         ids=["per_token_condition", "resampled_condition"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(reference, condition):
    model, batch, expected = reference
    config = MMInterleavedConfig.tiny()
    if condition is not None:  # the paper's condition resampler (checkpointed too), the release's conv_in MMFS
        config.decoder = dataclasses.replace(config.decoder, condition=condition, mmfs_conv_in=True, negative_init="empty_prompt")
        model = build(config)
        expected = loss_and_grads(model, batch)
    checkpointed = build(dataclasses.replace(config, gradient_checkpointing=True), model.state_dict())
    assert checkpointed.language.llm.model.layers[0].gradient_checkpointing
    assert checkpointed.decoder.unet.down_blocks[0].gradient_checkpointing
    assert checkpointed.vision.pyramid.gradient_checkpointing and checkpointed.vision.resampler.gradient_checkpointing
    assert checkpointed.decoder.gradient_checkpointing
    assert condition is None or checkpointed.decoder.condition.resampler.gradient_checkpointing
    recomputed = []  # the MMFS hooks inside a checkpointed LLM layer run again in the backward
    checkpointed.language.mmfs_blocks["0"].register_forward_hook(lambda *_: recomputed.append(torch.is_grad_enabled()))
    got = loss_and_grads(checkpointed, batch)
    assert len(recomputed) == 2
    assert_same_step(expected, got)
    assert {n for n, g in got[1].items() if g.abs().sum() > 0} >= {
        "language.mmfs_blocks.0.mmfs.value_proj.weight", "decoder.skip_mmfs.0.mmfs.value_proj.weight",
        "vision.resampler.queries", "decoder.unet.conv_in.weight",
    }


@pytest.mark.parametrize("micro_batch", [1, 3])
def test_unet_micro_batches_give_the_same_loss_and_gradients(reference, micro_batch):
    model, batch, expected = reference
    tiny = MMInterleavedConfig.tiny()
    config = dataclasses.replace(tiny, decoder=dataclasses.replace(tiny.decoder, unet_micro_batch=micro_batch))
    micro = build(config, model.state_dict())
    calls = []
    micro.decoder.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    got = loss_and_grads(micro, batch)
    assert sum(calls) == 4 and max(calls) == micro_batch  # 2 rows x 2 images with text before them
    assert_same_step(expected, got)


def all_slots_context(model: MMInterleaved, vision, layout, targets) -> DecoderContext:
    """The decoder context as it was before it kept only visible images: every image slot of the target's row."""
    f = model._row_features(vision.feature_maps, model.config.decoder.feature_levels, layout)
    rows = layout.row[targets]
    slots = torch.arange(layout.row_images.shape[1])
    visible = (layout.slot_valid[rows] & (layout.slot_document[rows] == layout.document[targets][:, None])
               & (slots[None] < layout.slot[targets][:, None]))
    counts = visible.long()
    relative = counts.flip(-1).cumsum(-1).flip(-1) * counts
    return DecoderContext(ImageFeatures(f.values[rows], f.spatial_shapes, f.level_start_index), visible, relative)


def three_document_row(model: MMInterleaved) -> InterleavedBatch:
    """One row: a story of three images with text before each, a caption after its image, a caption before it."""
    size = model.image_size[0]
    docs = [
        ["a red square", square_image("red", size), "then a blue one", square_image("blue", size), "and green",
         square_image("green", size, offset=2), "the end."],
        [square_image("yellow", size), "a yellow square."],
        ["a blue square", square_image("blue", size, offset=3)],
    ]
    ids, doc_ids, images = [], [], []
    for index, elements in enumerate(docs):
        tokens, doc_images = encode_document(model.tokenizer, elements, model.boi_token_id, model.image_token_id,
                                             model.num_visual_tokens, (size, size))
        ids, doc_ids, images = ids + tokens, doc_ids + [index] * len(tokens), images + doc_images
    return InterleavedBatch(torch.tensor([ids]), torch.tensor([doc_ids]), torch.stack(images))


def test_unet_mmfs_samples_only_visible_images_with_the_same_result(reference):
    model = reference[0]
    batch = three_document_row(model)
    layout = model._layout(batch.input_ids, batch.document_ids)
    targets = model._image_has_context(batch, layout).nonzero(as_tuple=True)[0]
    condition = Condition(torch.randn(len(targets), 5, 32), torch.ones(len(targets), 5, dtype=torch.bool))
    slots_sampled = []
    model.decoder.skip_mmfs[0].mmfs.register_forward_pre_hook(
        lambda module, args: slots_sampled.append(args[2].values.shape[1]))
    losses = []
    with torch.no_grad():
        vision = model.vision(batch.images)
        contexts = (all_slots_context(model, vision, layout, targets), model._decoder_context(vision, layout, targets))
        for context in contexts:
            torch.manual_seed(0)
            losses.append(model.decoder.loss(batch.images[targets], condition, context))
    assert slots_sampled == [5, 2]  # the row holds 5 images; a trained image sees at most 2 earlier ones
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_unet_mmfs_keeps_one_invisible_slot_when_no_trained_image_sees_an_earlier_one(reference):
    """So every batch with trained images has the same autograd graph (ZeRO-2 reduces gradients in graph order)."""
    model, batch, _ = reference
    layout = model._layout(batch.input_ids, batch.document_ids)
    first_images = torch.tensor([0, 3])  # the first image of each row: nothing before it in its document
    with torch.no_grad():
        context = model._decoder_context(model.vision(batch.images), layout, first_images)
    assert context.features.values.shape[:2] == (2, 1) and not context.visible.any()
