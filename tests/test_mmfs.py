"""MMFS: init, the sink, visibility masking, relative positions, and the op backends agree."""

import dataclasses

import pytest
import torch

from model.config import DecoderConfig, LanguageConfig, MMFSConfig
from model.image_decoder import DecoderContext, SkipMMFS
from model.mmfs import (
    MMFS,
    ImageFeatures,
    flatten_feature_maps,
    grid_reference_points,
    visibility_and_relative_position,
)

CONFIG = MMFSConfig(num_heads=2, num_points=3, hidden_size=16, offset_init=1.0, base_spatial_shape=4, max_images=4)


def make_inputs(n=2, lq=5, k=3, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(n, k, c, 4, 4, generator=g), torch.randn(n, k, c, 2, 2, generator=g)]
    values, shapes, starts = flatten_feature_maps(maps)
    query = torch.randn(n, lq, 12, generator=g)
    visible = torch.rand(n, lq, k, generator=g) > 0.4
    relative = visible.long().flip(-1).cumsum(-1).flip(-1) * visible.long()
    return query, ImageFeatures(values, shapes, starts), visible, relative


def make_mmfs(seed=0, active=True):
    torch.manual_seed(seed)
    mmfs = MMFS(CONFIG, query_dim=12, value_dim=8, output_dim=12, num_levels=2)
    if active:  # larger logits than the init, and offsets that depend on the query
        torch.nn.init.normal_(mmfs.attention_logits.weight, std=0.5)
        torch.nn.init.normal_(mmfs.sampling_offsets.weight, std=0.1)
    return mmfs


def test_init_follows_the_release():
    """Zero offset weights with a uniform bias; attention logits with nn.Linear's default weights (kaiming-uniform,
    bound 1/sqrt(fan_in)) and a zero bias, so that the logits depend on the query from the first step."""
    mmfs = make_mmfs(active=False)
    weight = mmfs.attention_logits.weight
    assert torch.all(mmfs.attention_logits.bias == 0)
    assert weight.std() > 0 and weight.abs().max() <= 1 / weight.shape[1] ** 0.5
    assert torch.all(mmfs.sampling_offsets.weight == 0)
    bias = mmfs.sampling_offsets.bias
    assert bias.abs().max() <= CONFIG.offset_init and bias.std() > 0


def test_shapes_and_gradients():
    mmfs = make_mmfs()
    query, features, visible, relative = make_inputs()
    query.requires_grad_(True)
    out = mmfs(query, torch.full((5, 2), 0.5), features, visible, relative)
    assert out.shape == (2, 5, 12)
    out.square().sum().backward()
    for name in ("value_proj", "sampling_offsets", "attention_logits", "relative_position", "dynamic_query"):
        assert getattr(mmfs, name).weight.grad.abs().sum() > 0, name
    assert query.grad.abs().sum() > 0


def test_query_that_sees_no_image_gets_exactly_zero():
    """All weight on the sink, and no output bias: a query without images is a query without MMFS (trained
    biases included), so sampling with no context agrees with training on images that had none."""
    mmfs = make_mmfs()
    with torch.no_grad():
        mmfs.output_proj.bias.normal_()
    query, features, visible, relative = make_inputs()
    visible[1] = False
    out = mmfs(query, torch.full((5, 2), 0.5), features, visible, relative * visible.long())
    assert torch.all(out[1] == 0) and out[0].abs().sum() > 0
    empty = ImageFeatures(features.values[:, :0], features.spatial_shapes, features.level_start_index)
    assert torch.all(mmfs(query, torch.full((5, 2), 0.5), empty, visible[:, :, :0], relative[:, :, :0]) == 0)


def test_invisible_images_have_no_influence_and_visible_ones_do():
    mmfs = make_mmfs()
    query, features, visible, relative = make_inputs(k=3)
    visible[:] = True
    visible[:, :, 1] = False
    relative = visible.long().flip(-1).cumsum(-1).flip(-1) * visible.long()
    ref = grid_reference_points(1, 5).view(5, 2)
    out = mmfs(query, ref, features, visible, relative)
    changed = features.values.clone()
    changed[:, 1] += torch.randn_like(changed[:, 1])
    out_invisible = mmfs(query, ref, ImageFeatures(changed, features.spatial_shapes, features.level_start_index), visible, relative)
    torch.testing.assert_close(out_invisible, out)
    changed = features.values.clone()
    changed[:, 2] += 1.0
    out_visible = mmfs(query, ref, ImageFeatures(changed, features.spatial_shapes, features.level_start_index), visible, relative)
    assert not torch.allclose(out_visible, out)


def test_weights_are_one_softmax_across_images():
    # With a constant value map of 1 per image and all offsets landing inside the maps, the
    # output before the projection is the total non-sink weight: N/(N+1) with N real slots when
    # logits are zero (joint softmax), independent of how the slots split across images.
    mmfs = MMFS(MMFSConfig(num_heads=1, num_points=2, hidden_size=1, offset_init=0.0, base_spatial_shape=4), 4, 1, 1, 1)
    with torch.no_grad():
        mmfs.attention_logits.weight.zero_()
        mmfs.value_proj.weight.fill_(1.0)
        mmfs.value_proj.bias.zero_()
        mmfs.output_proj.weight.fill_(1.0)
        mmfs.output_proj.bias.zero_()
    values, shapes, starts = flatten_feature_maps([torch.ones(1, 3, 1, 4, 4)])
    features = ImageFeatures(values, shapes, starts)
    query = torch.randn(1, 2, 4)
    for visible_images in (1, 2, 3):
        visible = torch.zeros(1, 2, 3, dtype=torch.bool)
        visible[..., :visible_images] = True
        relative = visible.long().flip(-1).cumsum(-1).flip(-1) * visible.long()
        out = mmfs(query, torch.full((2, 2), 0.5), features, visible, relative)
        slots = visible_images * 1 * 2  # images x levels x points
        torch.testing.assert_close(out, torch.full_like(out, slots / (slots + 1)))


def test_visibility_and_relative_position():
    # one row: doc 0 holds tokens 0..5 with images starting at 2 and 4; doc 1 holds 6..9, image at 8
    doc = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
    pos = torch.arange(10)[None]
    visible, relative = visibility_and_relative_position(
        doc, pos, torch.tensor([[0, 0, 1]]), torch.tensor([[2, 4, 8]]), torch.tensor([[True, True, True]])
    )
    assert visible[0, :, 0].tolist() == [False, False, True, True, True, True, False, False, False, False]
    assert visible[0, :, 2].tolist() == [False] * 8 + [True, True]
    assert relative[0, 5].tolist() == [2, 1, 0]
    assert relative[0, 3].tolist() == [1, 0, 0]
    assert relative[0, 9].tolist() == [0, 0, 1]


def test_mmfs_cpu_kernel_matches_reference(monkeypatch):
    mmfs = make_mmfs()
    query, features, visible, relative = make_inputs()
    ref = torch.rand(2, 5, 2)
    monkeypatch.setenv("WEFT_DEFORM_BACKEND", "reference")
    expected = mmfs(query, ref, features, visible, relative)
    monkeypatch.setenv("WEFT_DEFORM_BACKEND", "cpu")
    out = mmfs(query, ref, features, visible, relative)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_unet_offsets_are_in_pixels_of_the_query_map():
    """The release's UNet MMFS normalises offsets by the query map's own resolution, not a fixed base: on a 4x4 skip
    map the same weights sample as with base 4, not as with base 16; text queries (no map) must name a base."""
    config = MMFSConfig(num_heads=2, num_points=3, hidden_size=8, offset_init=2.0, base_spatial_shape=None, max_images=4)
    assert DecoderConfig(unet_config={}, vae_config={}).mmfs.base_spatial_shape is None
    _, features, _, _ = make_inputs(n=2, k=3)
    context = DecoderContext(features, torch.tensor([[True, True, False], [True, False, False]]), torch.tensor([[2, 1, 0], [1, 0, 0]]))
    feature = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    outputs = {}
    for base in (None, 4, 16):
        torch.manual_seed(0)
        block = SkipMMFS(dataclasses.replace(config, base_spatial_shape=base), 8, 8, 2)
        torch.nn.init.normal_(block.zero_conv.weight)
        outputs[base] = block(feature, context)
    torch.testing.assert_close(outputs[None], outputs[4])
    assert not torch.allclose(outputs[None], outputs[16])
    query, features, visible, relative = make_inputs()
    with pytest.raises(ValueError, match="query_shape"):
        MMFS(config, 12, 8, 12, 2)(query, torch.full((5, 2), 0.5), features, visible, relative)
    with pytest.raises(ValueError, match="language.mmfs.base_spatial_shape"):
        LanguageConfig(llm_config={"model_type": "llama"}, mmfs=config)
