"""The ViT-Adapter pyramid: pixel detail the ViT grid lacks, gradients, the frozen ViT untouched, the paper's shapes."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from model.config import PYRAMIDS, MMInterleavedConfig, ViTAdapterConfig
from model.vision import PYRAMID_BUILDERS, ImageTokenizer
from model.vit_adapter import interaction_segments


@pytest.fixture()
def tokenizer():
    torch.manual_seed(0)
    return ImageTokenizer(MMInterleavedConfig.tiny().vision, output_dim=64).train()


def block_pattern(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` grey 32-px images of random black / white 2x2-pixel blocks (16 blocks in each 8-px ViT patch) and their
    block labels ``(n, 1, 16, 16)``: one label per cell of the tiny preset's 1/4 level (4x its 4x4 patch grid)."""
    labels = torch.randint(0, 2, (n, 1, 16, 16), generator=generator).float()
    return F.interpolate(labels, scale_factor=2, mode="nearest").expand(n, 3, 32, 32), labels


def probe_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor) -> float:
    """Held-out accuracy of a 1x1-convolution logistic probe fitted to fixed features ``(n, C, 16, 16)``."""
    mean, std = train.mean((0, 2, 3), keepdim=True), train.std((0, 2, 3), keepdim=True) + 1e-6
    probe = torch.nn.Conv2d(train.shape[1], 1, 1)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(300):
        loss = F.binary_cross_entropy_with_logits(probe((train - mean) / std), train_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return ((probe((test - mean) / std) > 0).float() == test_labels).float().mean().item()


def test_the_quarter_level_carries_pixel_detail_the_vit_grid_does_not(tokenizer):
    """Blocks of 2x2 pixels vary inside each ViT patch: a linear probe reads them from the untrained adapter's 1/4 map
    well above chance, and barely from the last layer's grid upsampled to the same size; a short fit of the adapter
    with the probe makes them exact (the frozen ViT's grid cannot learn)."""
    g = torch.Generator().manual_seed(0)
    (train, train_labels), (test, test_labels) = block_pattern(64, g), block_pattern(32, g)

    def features(images):
        with torch.no_grad():
            patches, maps = tokenizer.pyramid(tokenizer.vit, (images - tokenizer.mean) / tokenizer.std)
        grid = patches.transpose(1, 2).reshape(len(images), -1, 4, 4)
        return maps[0], F.interpolate(grid, size=(16, 16), mode="bilinear", align_corners=False)

    (quarter_train, grid_train), (quarter_test, grid_test) = features(train), features(test)
    assert quarter_train.shape[-2:] == (16, 16)
    assert probe_accuracy(quarter_train, train_labels, quarter_test, test_labels) > 0.72
    assert probe_accuracy(grid_train, train_labels, grid_test, test_labels) < 0.62

    probe = torch.nn.Conv2d(quarter_train.shape[1], 1, 1)
    optimizer = torch.optim.Adam([*probe.parameters(), *tokenizer.pyramid.parameters()], lr=3e-3)
    for _ in range(30):
        _, maps = tokenizer.pyramid(tokenizer.vit, (train - tokenizer.mean) / tokenizer.std)
        loss = F.binary_cross_entropy_with_logits(probe(maps[0]), train_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        _, maps = tokenizer.pyramid(tokenizer.vit, (test - tokenizer.mean) / tokenizer.std)
        assert ((probe(maps[0]) > 0).float() == test_labels).float().mean() > 0.95


def test_an_untrained_adapter_leaves_the_frozen_vit_unchanged(tokenizer):
    images = (torch.rand(2, 3, 32, 32) - tokenizer.mean) / tokenizer.std
    patches, _ = tokenizer.pyramid(tokenizer.vit, images)
    plain = tokenizer.vit.forward_intermediates(images, indices=1, intermediates_only=True)["image_intermediates"][-1]
    torch.testing.assert_close(patches, plain.flatten(2).transpose(1, 2))


def test_gradients_reach_the_stem_and_every_interaction_and_not_the_vit(tokenizer):
    adapter = tokenizer.pyramid
    with torch.no_grad():  # open the injectors' gates, as after a few steps, so their attention gets gradients too
        for interaction in adapter.interactions:
            interaction.injector.gamma.fill_(0.1)
    out = tokenizer(torch.rand(2, 3, 32, 32))
    (sum(m.square().mean() for m in out.feature_maps) + out.visual_tokens.square().mean()).backward()
    assert all(p.grad is None for p in tokenizer.vit.parameters())
    moved = {name for name, p in adapter.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for i in range(len(adapter.interactions)):
        assert {f"interactions.{i}.injector.gamma", f"interactions.{i}.injector.attention.value_proj.weight",
                f"interactions.{i}.injector.attention.sampling_offsets.weight",
                f"interactions.{i}.extractors.0.attention.value_proj.weight",
                f"interactions.{i}.extractors.0.ffn.depthwise.weight"} <= moved
    assert {"spatial_prior.stem.0.0.weight", "spatial_prior.downsamples.2.0.weight", "spatial_prior.projections.0.weight",
            "level_embed", "upsample.weight"} <= moved


def test_interactions_end_at_evenly_spaced_layers_unless_configured():
    assert interaction_segments(None, 24) == [(0, 5), (6, 11), (12, 17), (18, 23)]
    assert interaction_segments((5, 11, 17, 23), 24) == interaction_segments(None, 24)
    assert interaction_segments(None, 2) == [(0, 0), (1, 1)]
    with pytest.raises(ValueError, match="last layer"):
        interaction_segments((5, 11), 24)
    with pytest.raises(ValueError, match="strictly increasing"):
        ViTAdapterConfig(layers=(5, 5, 23))


def test_the_paper_preset_gives_the_releases_pyramid_on_fake_tensors():
    """CLIP ViT-L/14 at 224 px: a 16x16 patch grid, the stem at 256 px, maps of 64², 32², 16², 8² x 1024 channels."""
    vision = MMInterleavedConfig.paper_architecture().vision
    assert vision.pyramid == "vit_adapter"
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        tokenizer = ImageTokenizer(vision, output_dim=5120).train()
        tokenizer.enable_gradient_checkpointing()
        out = tokenizer(torch.empty(2, 3, 224, 224))
    assert all(isinstance(m, torch._subclasses.FakeTensor) and m.fake_mode is mode for m in out.feature_maps)
    assert [tuple(m.shape) for m in out.feature_maps] == [(2, 1024, s, s) for s in (64, 32, 16, 8)]
    assert tuple(out.visual_tokens.shape) == (2, 64, 5120)
    adapter = tokenizer.pyramid
    assert adapter.segments == [(0, 5), (6, 11), (12, 17), (18, 23)]
    assert [len(i.extractors) for i in adapter.interactions] == [1, 1, 1, 3]
    assert adapter.spatial_prior.projections[0].in_channels == 64


def test_every_configurable_pyramid_has_a_builder():
    assert tuple(PYRAMID_BUILDERS) == PYRAMIDS


def test_the_simple_pyramid_gives_the_same_shapes(tokenizer):
    """``pyramid="simple"`` (learned resamplings of the last ViT layer's grid) is a drop-in for the adapter."""
    simple = ImageTokenizer(dataclasses.replace(tokenizer.config, pyramid="simple"), output_dim=64).train()
    images = torch.rand(2, 3, 32, 32)
    got, expected = simple(images), tokenizer(images)
    assert [m.shape for m in got.feature_maps] == [m.shape for m in expected.feature_maps]
    assert got.visual_tokens.shape == expected.visual_tokens.shape


def test_a_pyramid_wider_than_the_vit_is_refused():
    vision = MMInterleavedConfig.tiny().vision
    with pytest.raises(ValueError, match="ViT's width 32"):
        ImageTokenizer(dataclasses.replace(vision, pyramid_channels=48), output_dim=64)


@pytest.mark.parametrize("pyramid", PYRAMIDS)
def test_a_trained_vit_gets_gradients_through_either_pyramid(pyramid):
    torch.manual_seed(0)
    vision = dataclasses.replace(MMInterleavedConfig.tiny().vision, pyramid=pyramid, train_vit=True)
    tokenizer = ImageTokenizer(vision, output_dim=64).train()
    out = tokenizer(torch.rand(2, 3, 32, 32))
    (sum(m.square().mean() for m in out.feature_maps) + out.visual_tokens.square().mean()).backward()
    for name in ("conv1.weight", "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.1.mlp.c_fc.weight"):
        assert tokenizer.vit.get_parameter(name).grad.abs().sum() > 0, name
