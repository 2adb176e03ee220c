"""Image tokenizer and image decoder on their own."""

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler

from model.condition import Condition, LayerMix, ResampledCondition
from model.config import SD21_BASE_SCHEDULER, SD21_BASE_UNET, SD21_BASE_VAE, DecoderConfig, MMInterleavedConfig, ResamplerConfig
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
    """...and stays exactly zero for an image that sees no earlier image, trained biases and all: training runs
    such images with an empty context, sampling may pass none."""
    torch.manual_seed(0)
    decoder = ImageDecoder(config.decoder, llm_hidden_size=64, feature_dim=32, num_levels=4).eval()
    assert len(decoder.skip_mmfs) == 3  # resnet + downsampler of block 0, resnet of block 1
    latents = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 500])
    condition = Condition(torch.randn(2, 16, 32), torch.ones(2, 16, dtype=torch.bool))
    context = context_for(2, 2)
    with torch.no_grad():
        plain = decoder.unet_forward(latents, t, condition, None)
        torch.testing.assert_close(decoder.unet_forward(latents, t, condition, context), plain)
        for block in [*decoder.skip_mmfs, decoder.mid_mmfs]:
            torch.nn.init.normal_(block.zero_conv.weight, std=0.1)
            torch.nn.init.normal_(block.zero_conv.bias, std=0.1)
            torch.nn.init.normal_(block.mmfs.output_proj.bias, std=0.1)
        with_images = decoder.unet_forward(latents, t, condition, context)
        unseen = DecoderContext(context.features, torch.zeros_like(context.visible), context.relative_position * 0)
        torch.testing.assert_close(decoder.unet_forward(latents, t, condition, unseen), plain)
        changed = context_for(2, 2, seed=1)
        with_other_images = decoder.unet_forward(latents, t, condition, changed)
    assert not torch.allclose(with_images, plain)
    assert not torch.allclose(with_images, with_other_images)
    assert decoder._context is None  # the context lives only inside one UNet call


def test_conv_in_skip_gets_mmfs_as_the_release(config):
    """12 skip blocks + mid for SD-2.1 (conv_in's output, then each down block's resnets and downsampler); conv_in's
    residual reaches the output through its skip only, the down path keeps the plain conv_in output."""
    sd21 = DecoderConfig(unet_config=SD21_BASE_UNET, vae_config=SD21_BASE_VAE, scheduler_config=SD21_BASE_SCHEDULER)
    with torch.device("meta"):
        decoder = ImageDecoder(sd21, llm_hidden_size=5120, feature_dim=1024, num_levels=4)
    assert [b.zero_conv.out_channels for b in decoder.skip_mmfs] == [320] * 4 + [640] * 3 + [1280] * 5
    assert decoder.mid_mmfs is not None

    torch.manual_seed(0)
    decoder = ImageDecoder(dataclasses.replace(config.decoder, mmfs_conv_in=True), llm_hidden_size=64, feature_dim=32,
                           num_levels=4).eval()
    assert len(decoder.skip_mmfs) == 4 and decoder.skip_mmfs[0].zero_conv.out_channels == decoder.unet.conv_in.out_channels
    down_inputs = []
    decoder.unet.down_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: down_inputs.append(kwargs["hidden_states"]), with_kwargs=True)
    latents, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
    condition = Condition(torch.randn(2, 16, 32), torch.ones(2, 16, dtype=torch.bool))
    with torch.no_grad():
        torch.nn.init.normal_(decoder.skip_mmfs[0].zero_conv.weight, std=0.1)
        plain = decoder.unet_forward(latents, t, condition, None)
        with_images = decoder.unet_forward(latents, t, condition, context_for(2, 2))
    assert not torch.allclose(with_images, plain)
    torch.testing.assert_close(down_inputs[1], down_inputs[0])


def test_context_positions_count_back_from_boi_as_the_release(config):
    """The token before <BoI> (here the last real one) is at position 0 whatever the context's length: the condition of
    a padded context is the unpadded one's, and reading the context forward from <BoI> gives the release's reversed
    context (the resampler's attention is blind to order but for the positions)."""
    resampled = dataclasses.replace(config.decoder, condition=ResamplerConfig(num_queries=5, hidden_size=32, num_layers=1, num_heads=2))
    assert resampled.context_positions == "from_boi"
    torch.manual_seed(0)
    from_boi = ResampledCondition(resampled, 64, 32).eval()
    from_start = ResampledCondition(dataclasses.replace(resampled, context_positions="from_start"), 64, 32).eval()
    from_start.load_state_dict(from_boi.state_dict())
    hidden, full = torch.randn(1, 6, 64), torch.ones(1, 6, dtype=torch.bool)
    padded, mask = torch.cat([hidden, torch.randn(1, 3, 64)], 1), torch.cat([full, torch.zeros(1, 3, dtype=torch.bool)], 1)
    with torch.no_grad():
        torch.testing.assert_close(from_boi(padded, mask).tokens, from_boi(hidden, full).tokens)
        torch.testing.assert_close(from_boi(hidden, full).tokens, from_start(hidden.flip(1), full).tokens)
        assert not torch.allclose(from_boi(hidden, full).tokens, from_start(hidden, full).tokens)
    with pytest.raises(ValueError, match="decoder.context_positions"):
        dataclasses.replace(resampled, context_positions="backwards")


def test_decoder_loss_and_sampling(config):
    torch.manual_seed(0)
    decoder = ImageDecoder(config.decoder, llm_hidden_size=64, feature_dim=32, num_levels=4).train()
    condition = decoder.encode_condition(torch.randn(2, 7, 1, 64), torch.tensor([[True] * 7, [True] * 3 + [False] * 4]))
    assert condition.tokens.shape == (2, 7, 32) and condition.mask.sum(1).tolist() == [7, 3]
    loss = decoder.loss(torch.rand(2, 3, 32, 32), condition, context_for(2, 1))
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert decoder.condition.project.weight.grad.abs().sum() > 0 and decoder.unet.conv_in.weight.grad.abs().sum() > 0
    images = decoder.sample(condition.detach(), context_for(2, 1), guidance_scale=2.0, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_noise_draws_run_the_unet_on_each_image_k_times_with_its_own_condition_and_context(config):
    torch.manual_seed(0)
    decoder = ImageDecoder(dataclasses.replace(config.decoder, noise_draws=3, condition_dropout=0.0), llm_hidden_size=64,
                           feature_dim=32, num_levels=4).train()
    condition = decoder.encode_condition(torch.randn(2, 7, 1, 64), torch.tensor([[True] * 7, [True] * 3 + [False] * 4]))
    calls = []
    unet_forward = decoder.unet_forward

    def recorded(latents, timesteps, condition, context):
        calls.append((timesteps, condition, context))
        return unet_forward(latents, timesteps, condition, context)

    decoder.unet_forward = recorded
    loss = decoder.loss(torch.rand(2, 3, 32, 32), condition, context_for(2, 1))
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    [(timesteps, seen, context)] = calls
    assert timesteps.shape == (6,) and timesteps.unique().numel() > 2  # one draw per (draw, image)
    for draw in range(3):  # draw-major: rows 2d, 2d+1 are images 0, 1
        assert torch.equal(seen.tokens[2 * draw:2 * draw + 2], condition.tokens)
        assert torch.equal(seen.mask[2 * draw:2 * draw + 2], condition.mask)
        assert torch.equal(context.features.values[2 * draw:2 * draw + 2], context_for(2, 1).features.values)
    loss.mean().backward()
    assert decoder.condition.project.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="noise_draws must be at least 1, got 0"):
        dataclasses.replace(config.decoder, noise_draws=0)


@pytest.mark.parametrize("bias, mean", [(0.0, 1 / 2), (1.0, 2 / 3), (3.0, 4 / 5)])
def test_training_timesteps_follow_their_bias(config, bias, mean):
    """Density proportional to t ** bias over [0, T): mean T (bias + 1) / (bias + 2); every draw a valid step."""
    decoder = ImageDecoder(dataclasses.replace(config.decoder, timestep_bias=bias), llm_hidden_size=64,
                           feature_dim=32, num_levels=4)
    torch.manual_seed(0)
    steps = decoder.training_timesteps(20000)
    total = decoder.train_scheduler.config.num_train_timesteps
    assert steps.dtype == torch.long and steps.min() >= 0 and steps.max() <= total - 1
    assert abs(steps.float().mean().item() / total - mean) < 0.01
    # a quarter of the draws of uniform sampling falls in the noisiest quarter; more the stronger the bias
    assert abs((steps >= 0.75 * total).float().mean().item() - (1 - 0.75 ** (bias + 1))) < 0.01


def test_decoders_built_from_scratch_train_to_zero_terminal_snr_and_sample_from_the_last_timestep(config):
    """Stable Diffusion's schedule leaves sqrt(alpha_bar) = 0.068 of the latents at t=999 and its DDIM begins at t=900
    with 10 steps: enough of small latents for the UNet to place shapes from the noise, not the prompt (see
    model.image_decoder). Trained to zero terminal SNR (v-prediction), sampled from t=999."""
    decoder = ImageDecoder(config.decoder, llm_hidden_size=64, feature_dim=32, num_levels=4)
    alphas = decoder.train_scheduler.alphas_cumprod
    assert alphas[-1] < 1e-6 and decoder.train_scheduler.config.prediction_type == "v_prediction"
    sampler = DDIMScheduler.from_config(decoder.scheduler_config)
    sampler.set_timesteps(10)
    assert int(sampler.timesteps[0]) == len(alphas) - 1
    # the v target: sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0, so at t=999 the UNet must produce -x0 itself
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    last = torch.full((2,), len(alphas) - 1)
    assert torch.allclose(decoder.train_scheduler.get_velocity(latents, noise, last), -latents, atol=1e-3)


def test_timestep_bias_is_checked(config):
    with pytest.raises(ValueError, match="timestep_bias must be >= 0, got -1"):
        dataclasses.replace(config.decoder, timestep_bias=-1.0)


def test_padding_a_per_token_condition_changes_nothing(config):
    """Per-token conditions of different widths are padded into one batch; the mask keeps the padding unseen."""
    torch.manual_seed(0)
    decoder = ImageDecoder(config.decoder, llm_hidden_size=64, feature_dim=32, num_levels=4).eval()
    condition = decoder.encode_condition(torch.randn(1, 5, 1, 64), torch.ones(1, 5, dtype=torch.bool))
    padded = Condition.cat([condition, decoder.encode_condition(torch.randn(1, 9, 1, 64), torch.ones(1, 9, dtype=torch.bool))])
    latents, t = torch.randn(1, 4, 16, 16), torch.tensor([300])
    with torch.no_grad():
        alone = decoder.unet_forward(latents, t, condition, None)
        in_batch = decoder.unet_forward(latents.repeat(2, 1, 1, 1), t.repeat(2), padded, None)[:1]
    torch.testing.assert_close(in_batch, alone, atol=1e-5, rtol=1e-4)


def test_resampled_condition_gives_a_fixed_number_of_tokens_from_the_last_layer(config):
    """The paper's condition: a Q-Former-style resampler over the last layer's states."""
    paper_style = dataclasses.replace(config.decoder, condition=ResamplerConfig(num_queries=7, hidden_size=32, num_layers=1, num_heads=2),
                                      condition_layers="last")
    decoder = ImageDecoder(paper_style, llm_hidden_size=64, feature_dim=32, num_levels=4)
    assert decoder.layer_mix is None and decoder.negative_condition.shape == (7, 32)
    condition = decoder.encode_condition(torch.randn(3, 6, 1, 64), torch.ones(3, 6, dtype=torch.bool))
    assert condition.tokens.shape == (3, 7, 32) and condition.mask.all()
    loss = decoder.loss(torch.rand(3, 3, 32, 32), condition, None)
    assert loss.shape == (3,) and torch.isfinite(loss).all()


def test_layer_mix_starts_as_the_mean_of_normalised_states():
    mix = LayerMix(3)
    states = torch.randn(2, 4, 3, 8) * torch.tensor([0.02, 1.0, 30.0])[None, None, :, None]
    normed = states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(mix(states), normed.mean(2))
    with pytest.raises(ValueError, match="expects 3 states"):
        mix(states[:, :, :2])


def test_fit_vae_learns_to_reconstruct_and_scales_latents_to_unit_variance(config):
    from diffusers import AutoencoderKL

    from model.image_decoder import fit_vae
    from tiny_inputs import square_image

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(config.decoder.vae_config).requires_grad_(False)
    images = torch.stack([square_image(c, 32, offset=o) for c in ("red", "green", "blue", "yellow") for o in (0, 4)])
    reported: list[float] = []
    losses = fit_vae(vae, images, steps=40, batch_size=8, lr=2e-3, on_step=reported.append)
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert reported == losses  # progress: every step's loss as it was made
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
    clipped it would end inside [-1, 1]. (An epsilon-predicting schedule, as Stable Diffusion's: a v-predicting UNet
    that predicts zero estimates x0 = sqrt(alpha_bar) x_t, which stays small whether clipped or not.)"""
    torch.manual_seed(0)
    decoder = ImageDecoder(dataclasses.replace(config.decoder, scheduler_config=SD21_BASE_SCHEDULER), llm_hidden_size=64,
                           feature_dim=32, num_levels=4).eval()
    with torch.no_grad():
        decoder.unet.conv_out.weight.zero_()
        decoder.unet.conv_out.bias.zero_()
    condition = decoder.encode_condition(torch.randn(2, 5, 1, 64), torch.ones(2, 5, dtype=torch.bool))
    latents = decoder.sample_latents(condition, context_for(2, 1), guidance_scale=1.0, num_inference_steps=5,
                                     generator=torch.Generator().manual_seed(0))
    assert latents.abs().max() > 5
