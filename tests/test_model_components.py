"""Image tokenizer and image decoder on their own."""

import pytest
import torch

from model.config import MMInterleavedConfig
from model.image_decoder import DecoderContext, ImageDecoder
from model.mmfs import ImageFeatures, flatten_feature_maps
from model.vision import ImageTokenizer


@pytest.fixture(scope="module")
def config():
    return MMInterleavedConfig.tiny(num_visual_tokens=6)


def test_image_tokenizer_shapes_and_frozen_vit(config):
    torch.manual_seed(0)
    tokenizer = ImageTokenizer(config.vision, output_dim=64).train()
    out = tokenizer(torch.rand(3, 3, 40, 40))  # resized to the ViT's 32 px: a 4x4 patch grid
    assert out.visual_tokens.shape == (3, 6, 64)
    assert [tuple(m.shape) for m in out.feature_maps] == [(3, 32, 16, 16), (3, 32, 8, 8), (3, 32, 4, 4), (3, 32, 2, 2)]
    assert not tokenizer.vit.training and not any(p.requires_grad for p in tokenizer.vit.parameters())
    out.visual_tokens.sum().backward()
    assert tokenizer.resampler.queries.grad.abs().sum() > 0
    # the visual tokens start small next to word embeddings (output init std 1e-3)
    assert out.visual_tokens.abs().mean() < 0.05


def context_for(n, k, channels=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(n, k, channels, s, s, generator=g) for s in (16, 8, 4, 2)]
    values, shapes, starts = flatten_feature_maps(maps)
    visible = torch.ones(n, k, dtype=torch.bool)
    relative = torch.arange(k, 0, -1).expand(n, k)
    return DecoderContext(ImageFeatures(values, shapes, starts), visible, relative)


def test_decoder_mmfs_is_zero_at_init_and_live_after_the_zero_convs_move(config):
    torch.manual_seed(0)
    decoder = ImageDecoder(config.decoder, llm_hidden_size=64, feature_dim=32, num_levels=4).eval()
    assert len(decoder.skip_mmfs) == 3  # resnet + downsampler of block 0, resnet of block 1
    latents = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 500])
    condition = torch.randn(2, 16, 32)
    context = context_for(2, 2)
    with torch.no_grad():
        plain = decoder.unet_forward(latents, t, condition, None)
        torch.testing.assert_close(decoder.unet_forward(latents, t, condition, context), plain)
        for block in [*decoder.skip_mmfs, decoder.mid_mmfs]:
            torch.nn.init.normal_(block.zero_conv.weight, std=0.1)
        with_images = decoder.unet_forward(latents, t, condition, context)
        changed = context_for(2, 2, seed=1)
        with_other_images = decoder.unet_forward(latents, t, condition, changed)
    assert not torch.allclose(with_images, plain)
    assert not torch.allclose(with_images, with_other_images)
    assert decoder._context is None  # the context lives only inside one UNet call


def test_decoder_loss_and_sampling(config):
    torch.manual_seed(0)
    decoder = ImageDecoder(config.decoder, llm_hidden_size=64, feature_dim=32, num_levels=4).train()
    condition = decoder.encode_condition(torch.randn(2, 7, 64), torch.tensor([[True] * 7, [True] * 3 + [False] * 4]))
    assert condition.shape == (2, 16, 32)
    loss = decoder.loss(torch.rand(2, 3, 32, 32), condition, context_for(2, 1))
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert decoder.condition.queries.grad.abs().sum() > 0 and decoder.unet.conv_in.weight.grad.abs().sum() > 0
    images = decoder.sample(condition.detach(), context_for(2, 1), guidance_scale=2.0, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_fit_vae_learns_to_reconstruct_and_scales_latents_to_unit_variance(config):
    from diffusers import AutoencoderKL

    from model.image_decoder import fit_vae
    from tiny_inputs import square_image

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(config.decoder.vae_config).requires_grad_(False)
    images = torch.stack([square_image(c, 32, offset=o) for c in ("red", "green", "blue", "yellow") for o in (0, 4)])
    losses = fit_vae(vae, images, steps=40, batch_size=8, lr=2e-3)
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    with torch.no_grad():
        latents = vae.encode(images * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    assert latents.std().item() == pytest.approx(1.0, rel=1e-3)
    # deterministic: a sampled latent is the mean, as it nearly is for Stable Diffusion's VAE
    with torch.no_grad():
        posterior = vae.encode(images * 2 - 1).latent_dist
    assert torch.allclose(posterior.sample(), posterior.mean, atol=1e-5)


def test_sampling_never_clips_latents(config):
    """DDIM's default clips every x0 estimate to [-1, 1], a pixel-space range that unit-variance latents leave
    often. With the UNet predicting zero noise, DDIM's x0 estimate is the start noise / sqrt(alpha_bar) (std ~15):
    clipped it would end inside [-1, 1]."""
    torch.manual_seed(0)
    decoder = ImageDecoder(config.decoder, llm_hidden_size=64, feature_dim=32, num_levels=4).eval()
    with torch.no_grad():
        decoder.unet.conv_out.weight.zero_()
        decoder.unet.conv_out.bias.zero_()
    condition = decoder.encode_condition(torch.randn(2, 5, 64), torch.ones(2, 5, dtype=torch.bool))
    latents = decoder.sample_latents(condition, context_for(2, 1), guidance_scale=1.0, num_inference_steps=5,
                                     generator=torch.Generator().manual_seed(0))
    assert latents.abs().max() > 5
