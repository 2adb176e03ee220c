"""MMFS-augmented diffusion image decoder: diffusers UNet + AutoencoderKL + scheduler.

- A Perceiver resampler maps the LLM's hidden states (document start .. ``<BoI>``, with 1-D
  sin-cos positions) to the UNet's condition tokens (77 in the paper).
- MMFS blocks give the UNet pixel-aligned access to the previous images of the document: one
  block per skip tensor (``conv_in``'s output and each down block's) and one on the mid block (queries = LayerNorm(pixel feature)
  + 2-D sin-cos position, reference points = the pixel grid), each ending in a zero-initialised
  1x1 convolution whose output is added to that skip connection only (ControlNet-style). They
  enter through forward hooks on the UNet's blocks (``conv_in``'s through a pre-hook on the last up block, where
  its skip is read); the UNet's source is untouched. The hooks
  read the current :class:`DecoderContext` from this module only inside
  :meth:`ImageDecoder._mmfs_context` (a ``with`` block around one UNet call).
- Classifier-free guidance: a learned negative condition replaces the condition with
  probability ``condition_dropout`` in training and drives the unconditional branch when sampling.
- Training timesteps: uniform as in Stable Diffusion, or drawn more often from the noisy end
  (``DecoderConfig.timestep_bias``; the presets built from scratch use 1).
- The noise schedule is the scheduler config's. The presets built from scratch rescale Stable Diffusion's betas to
  zero terminal SNR, predict v and let DDIM start at the last timestep ("trailing"), as Lin et al. 2023 ("Common
  Diffusion Noise Schedules and Sample Steps are Flawed") recommend, and weight the image loss 1, not the release's
  10. Why, measured on the sample world: SD's own schedule keeps sqrt(alpha_bar) = 0.068 of the latents at t=999, and
  a 10-step DDIM ("leading") starts at t=900 (0.119); on 8x8 or 16x16 latents of a few flat shapes that leak is
  enough to place them, so the UNet learned to draw whatever layout its start noise suggested: held-out samples were
  crisp scenes unrelated to their prompt, story continuations unrelated to the previous image, although both lowered
  the training loss. The tiny model on 2,000 separate caption-image pairs (16 a step, 1,000 steps, 64 held-out
  prompts) drew at attribute accuracy 0.67 / 0.69 (guidance 1 / 3) with this schedule against 0.23 / 0.31 with SD's.
  The v loss is ~10x the epsilon loss, so at weight 10 the image loss drowned the text loss (quality recipe captioning
  CIDEr 0.00; at weight 1, 1.12 against epsilon's 0.86). Pretrained decoders keep the schedule they were trained with.
- Memory: the diffusion loss runs the UNet on at most ``DecoderConfig.unet_micro_batch`` images per call, and
  :meth:`ImageDecoder.enable_gradient_checkpointing` recomputes the UNet's blocks, each MMFS skip and the
  condition resampler in the backward.

Where the release gives the UNet only the immediately preceding image, weft gives it every
previous image of the document, weighted by the same joint softmax and relative position as the LLM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn

from model.condition import Condition, LayerMix, ResampledCondition, build_condition_encoder
from model.config import DecoderConfig, MMFSConfig
from model.mmfs import MMFS, ImageFeatures, grid_reference_points, sincos_2d
from model.recompute import maybe_checkpoint


@dataclass
class DecoderContext:
    """Previous images each generated image may look at.

    Attributes:
        features: values ``(N, K, S, C)`` of K context-image slots (the decoder's pyramid levels).
        visible: ``(N, K)`` bool.
        relative_position: ``(N, K)`` int64, 1 = the immediately preceding image.
    """

    features: ImageFeatures
    visible: Tensor
    relative_position: Tensor

    def __getitem__(self, items: slice) -> "DecoderContext":
        """The context of ``items`` of the N images (views, no copy)."""
        f = self.features
        return DecoderContext(ImageFeatures(f.values[items], f.spatial_shapes, f.level_start_index),
                              self.visible[items], self.relative_position[items])

    def repeat(self, times: int) -> "DecoderContext":
        f = self.features
        return DecoderContext(
            ImageFeatures(f.values.repeat(times, 1, 1, 1), f.spatial_shapes, f.level_start_index),
            self.visible.repeat(times, 1),
            self.relative_position.repeat(times, 1),
        )


class SkipMMFS(nn.Module):
    """MMFS on one UNet feature map, returning a zero-initialised residual for its skip connection: exactly
    zero for an image that sees no earlier image, so sampling it with or without an empty context agrees with
    how it was trained."""

    def __init__(self, config: MMFSConfig, channels: int, feature_dim: int, num_levels: int) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(channels)
        self.feature_norm = nn.LayerNorm(feature_dim)
        self.mmfs = MMFS(config, channels, feature_dim, channels, num_levels)
        self.zero_conv = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.zero_conv.weight)
        nn.init.zeros_(self.zero_conv.bias)

    def forward(self, feature: Tensor, context: DecoderContext) -> Tensor:
        """``feature: (N, C, h, w)`` -> residual ``(N, C, h, w)``."""
        n, c, h, w = feature.shape
        query = self.query_norm(feature.flatten(2).transpose(1, 2)) + sincos_2d(h, w, c, feature.device).to(feature.dtype)
        reference = grid_reference_points(h, w, feature.device)
        f = context.features
        features = ImageFeatures(self.feature_norm(f.values), f.spatial_shapes, f.level_start_index)
        visible = context.visible[:, None, :].expand(n, h * w, -1)
        relative = context.relative_position[:, None, :].expand(n, h * w, -1)
        out = self.mmfs(query, reference, features, visible, relative, query_shape=(h, w))
        sees = context.visible.any(-1).to(feature.dtype)[:, None, None, None]
        return self.zero_conv(out.transpose(1, 2).reshape(n, c, h, w)) * sees


def load_diffusion_components(config: DecoderConfig) -> tuple[UNet2DConditionModel, AutoencoderKL, dict]:
    """UNet, VAE and scheduler config from a local directory or from config dicts (random init).

    The scheduler never clips: diffusers' DDPM/DDIM schedulers clip every step's ``x0`` estimate to
    ``[-1, 1]`` unless their config says ``clip_sample: false`` (Stable Diffusion's does). That range is
    a pixel-space model's; VAE latents at unit variance leave it often (15% of the tiny VAE's latent
    values did), and clipping them drew every sample-world colour as cyan. diffusers lists the keys a
    config left at their defaults in ``_use_default_values`` and re-defaults them when another scheduler
    class loads the config, overriding what is set here; that list is dropped.
    """
    if config.diffusion_path is not None:
        unet = UNet2DConditionModel.from_pretrained(config.diffusion_path, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(config.diffusion_path, subfolder="vae", local_files_only=True)
        scheduler_config = dict(DDPMScheduler.load_config(config.diffusion_path, subfolder="scheduler", local_files_only=True))
    else:
        unet = UNet2DConditionModel.from_config(config.unet_config)
        vae = AutoencoderKL.from_config(config.vae_config)
        scheduler_config = dict(DDPMScheduler.from_config(config.scheduler_config or {}).config)
    scheduler_config.pop("_use_default_values", None)
    return unet, vae, {**scheduler_config, "clip_sample": False}


class ImageDecoder(nn.Module):
    """Generates an image from LLM context features and the document's previous images.

    Args:
        config: decoder config.
        llm_hidden_size: width of the LLM hidden states used as condition.
        feature_dim: channels of the image feature maps (vision pyramid).
        num_levels: pyramid levels the MMFS blocks sample.
        num_llm_states: LLM states per token the condition reads (``condition_layers="all"``: the embeddings
            and every layer's output; ``"last"``: 1).
    """

    def __init__(self, config: DecoderConfig, llm_hidden_size: int, feature_dim: int, num_levels: int,
                 num_llm_states: int = 1) -> None:
        super().__init__()
        self.config = config
        self.unet, self.vae, self.scheduler_config = load_diffusion_components(config)
        self.vae.requires_grad_(False)
        if config.freeze_unet:
            self.unet.requires_grad_(False)
        self.train_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        cross_dim = self.unet.config.cross_attention_dim
        self.layer_mix = LayerMix(num_llm_states) if config.condition_layers == "all" else None
        self.condition = build_condition_encoder(config, llm_hidden_size, cross_dim)
        self.negative_condition = nn.Parameter(torch.randn(self.condition.num_negative_tokens, cross_dim) * 0.02)
        self.latent_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_size = (self.unet.config.sample_size * self.latent_scale,) * 2
        self._context: DecoderContext | None = None
        self.gradient_checkpointing = False

        self.skip_mmfs = nn.ModuleList()
        self.mid_mmfs: SkipMMFS | None = None
        if config.mmfs is not None:
            self._add_mmfs_hooks(config.mmfs, feature_dim, num_levels)

    # MMFS hooks -----------------------------------------------------------------------------
    def _add_mmfs_hooks(self, mmfs: MMFSConfig, feature_dim: int, num_levels: int) -> None:
        """``skip_mmfs`` in the UNet's skip order (``conv_in``'s first when ``config.mmfs_conv_in``), then the mid block's."""
        if self.config.mmfs_conv_in:
            self.skip_mmfs.append(SkipMMFS(mmfs, self.unet.conv_in.out_channels, feature_dim, num_levels))
            self.unet.up_blocks[-1].register_forward_pre_hook(self._conv_in_skip_hook, with_kwargs=True)
        for block in self.unet.down_blocks:
            channels = [resnet.out_channels for resnet in block.resnets]
            if getattr(block, "downsamplers", None) is not None:
                channels += [down.out_channels for down in block.downsamplers]
            start = len(self.skip_mmfs)
            self.skip_mmfs.extend(SkipMMFS(mmfs, c, feature_dim, num_levels) for c in channels)
            block.register_forward_hook(self._down_block_hook(start, len(channels)))
        mid_channels = self.unet.config.block_out_channels[-1]
        self.mid_mmfs = SkipMMFS(mmfs, mid_channels, feature_dim, num_levels)
        self.unet.mid_block.register_forward_hook(self._mid_block_hook)

    def _down_block_hook(self, start: int, count: int):
        def hook(module, args, output):
            if self._context is None:
                return output
            hidden, skips = output
            if len(skips) != count:
                raise RuntimeError(f"down block produced {len(skips)} skip tensors, expected {count}")
            skips = tuple(s + self._skip_residual(self.skip_mmfs[start + i], s) for i, s in enumerate(skips))
            return hidden, skips

        return hook

    def _conv_in_skip_hook(self, module, args, kwargs):
        """``conv_in``'s output is the first skip tensor the last up block reads: its residual is added there, so
        the down path keeps the plain ``conv_in`` output as the down blocks' hooks keep theirs."""
        if self._context is None:
            return None
        first, *rest = kwargs["res_hidden_states_tuple"]
        skips = (first + self._skip_residual(self.skip_mmfs[0], first), *rest)
        return args, {**kwargs, "res_hidden_states_tuple": skips}

    def _mid_block_hook(self, module, args, output):
        if self._context is None:
            return output
        return output + self._skip_residual(self.mid_mmfs, output)

    def _skip_residual(self, block: SkipMMFS, feature: Tensor) -> Tensor:
        """``block``'s residual for ``feature``, recomputed in the backward under gradient checkpointing (the
        checkpoint keeps the context it was called with: the backward runs after :meth:`_mmfs_context` has ended)."""
        return maybe_checkpoint(self.gradient_checkpointing, block, feature, self._context)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute in the backward: the UNet's blocks (diffusers' own checkpointing), each MMFS skip and the
        condition resampler's layers."""
        self.unet.enable_gradient_checkpointing()
        self.gradient_checkpointing = True
        if isinstance(self.condition, ResampledCondition):
            self.condition.resampler.gradient_checkpointing = True

    @contextmanager
    def _mmfs_context(self, context: DecoderContext | None) -> Iterator[None]:
        self._context = context if self.mid_mmfs is not None else None
        try:
            yield
        finally:
            self._context = None

    # condition ------------------------------------------------------------------------------
    def encode_condition(self, states: Tensor, mask: Tensor) -> Condition:
        """LLM states ``(N, W, S, D)`` (S per token: see ``num_llm_states``) with validity ``mask (N, W)``
        -> the UNet's condition tokens."""
        hidden = states[:, :, -1] if self.layer_mix is None else self.layer_mix(states)
        return self.condition(hidden, mask)

    def negative(self, n: int) -> Condition:
        """The learned unconditional condition (classifier-free guidance), for ``n`` items."""
        tokens = self.negative_condition.expand(n, -1, -1)
        return Condition(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))

    # latents --------------------------------------------------------------------------------
    def encode_images(self, images: Tensor, micro_batch: int | None = None) -> Tensor:
        """``(N, 3, H, W)`` in ``[0, 1]`` -> scaled latents sampled from the posterior (the VAE is frozen), at most
        ``micro_batch`` images per VAE call (``None``: all), contiguous.

        The posterior's noise is drawn for all images at once (as ``latent_dist.sample()`` draws it for one call), and
        the latents are made contiguous: PyTorch's CPU convolutions return channels-last maps for some batch sizes and
        not others, and ``randn_like`` (the diffusion noise) fills a tensor in memory order. So the latents and the
        noise do not depend on ``micro_batch``.
        """
        size = micro_batch or max(len(images), 1)
        with torch.no_grad():
            posteriors = [self.vae.encode(part.to(self.vae.dtype) * 2 - 1).latent_dist for part in images.split(size)]
            mean = torch.cat([p.mean for p in posteriors]).contiguous()
            std = torch.cat([p.std for p in posteriors]).contiguous()
            latents = mean + std * torch.randn_like(mean)
        return latents * self.vae.config.scaling_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((images + 1) / 2).clamp(0, 1)

    def unet_forward(self, latents: Tensor, timesteps: Tensor, condition: Condition, context: DecoderContext | None) -> Tensor:
        with self._mmfs_context(context):
            return self.unet(latents, timesteps, encoder_hidden_states=condition.tokens.to(latents.dtype),
                             encoder_attention_mask=condition.mask).sample

    # training -------------------------------------------------------------------------------
    def training_timesteps(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """``n`` timesteps in ``[0, T)`` drawn with density proportional to ``t ** config.timestep_bias`` (long)."""
        steps = self.train_scheduler.config.num_train_timesteps
        if self.config.timestep_bias == 0:
            return torch.randint(0, steps, (n,), device=device)
        u = torch.rand(n, device=device) ** (1.0 / (1.0 + self.config.timestep_bias))
        return (u * steps).long().clamp(max=steps - 1)

    def loss(self, images: Tensor, condition: Condition, context: DecoderContext | None) -> Tensor:
        """Per-image diffusion loss ``(N,)`` for ``images (N, 3, H, W)`` in ``[0, 1]``: the mean over
        ``config.noise_draws`` independent (noise, timestep, dropout) draws of each image, the LLM's condition and
        the context shared by all of them."""
        # 1. latents (each image's repeated once per draw, draw-major), noise, timesteps
        draws = self.config.noise_draws
        latents = self.encode_images(images, self.config.unet_micro_batch)
        if draws > 1:
            latents, condition = latents.repeat(draws, 1, 1, 1), condition.repeat(draws)
            context = None if context is None else context.repeat(draws)
        noise = torch.randn_like(latents)
        timesteps = self.training_timesteps(latents.shape[0], latents.device)
        noisy = self.train_scheduler.add_noise(latents, noise, timesteps)
        # 2. classifier-free guidance dropout
        if self.training and self.config.condition_dropout > 0:
            drop = torch.rand(len(condition), device=latents.device) < self.config.condition_dropout
            condition = condition.where(drop, self.negative(len(condition)))
        # 3. noise prediction, at most `unet_micro_batch` images per UNet call
        n = latents.shape[0]
        size = self.config.unet_micro_batch or max(n, 1)
        prediction = torch.cat([
            self.unet_forward(noisy[part], timesteps[part], condition[part], None if context is None else context[part])
            for part in (slice(i, i + size) for i in range(0, n, size))
        ])
        if self.train_scheduler.config.prediction_type == "v_prediction":
            target = self.train_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        per_draw = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
        return per_draw.view(draws, -1).mean(0)

    # sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        condition: Condition,
        context: DecoderContext | None,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 30,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """DDIM sampling with classifier-free guidance -> images ``(N, 3, H, W)`` in ``[0, 1]``."""
        return self.decode_latents(self.sample_latents(condition, context, guidance_scale, num_inference_steps, generator))

    @torch.no_grad()
    def sample_latents(
        self,
        condition: Condition,
        context: DecoderContext | None,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 30,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The DDIM loop of :meth:`sample`: scaled latents ``(N, C, h, w)``, never clipped."""
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        tokens = condition.tokens
        scheduler.set_timesteps(num_inference_steps, device=tokens.device)
        n = len(condition)
        shape = (n, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        latents = torch.randn(shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
        latents = latents * scheduler.init_noise_sigma
        guided = guidance_scale != 1.0
        if guided:
            condition = Condition.cat([self.negative(n), condition])
            context = None if context is None else context.repeat(2)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
            prediction = self.unet_forward(model_input, t.expand(model_input.shape[0]), condition, context)
            if guided:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = scheduler.step(prediction, t, latents).prev_sample
        return latents


def fit_vae(vae: AutoencoderKL, images: Tensor, *, steps: int = 300, batch_size: int = 32, lr: float = 2e-3,
            latent_weight: float = 1e-6, seed: int = 0,
            on_step: Callable[[float], None] | None = None) -> list[float]:
    """Fit a randomly initialised VAE to ``images (N, 3, H, W)`` in ``[0, 1]`` as a deterministic autoencoder,
    set its ``scaling_factor`` so that latents have unit variance, and freeze it again.

    The ``tiny`` preset's stand-in for Stable Diffusion's pretrained VAE: with a random frozen VAE the
    decoder's images are noise whatever the UNet learns. Reconstruction is trained through the posterior
    mean (plus ``latent_weight`` times the KL's mean term, which keeps latents near the origin), and the
    posterior's log-variance is then fixed at -30, diffusers' lower clamp, so ``latent_dist.sample()`` is
    the mean, as it nearly is for Stable Diffusion's VAE. Fitted through sampled latents instead, as this
    function once did, the posterior kept a std of ~0.6 of the latents' own after 300 steps: the decoder
    learned to ignore that noise, but the UNet trained on it, wasting its capacity on denoising noise no
    condition can predict (its loss at t=50 was 0.83 instead of 0.13). ``on_step`` gets each step's loss as
    it is made (progress). Returns the loss of every step.
    """
    generator = torch.Generator().manual_seed(seed)
    vae.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        x = images[torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)] * 2 - 1
        mean = vae.encode(x.to(vae.dtype)).latent_dist.mean
        reconstruction = vae.decode(mean).sample
        loss = F.mse_loss(reconstruction.float(), x.float()) + latent_weight * 0.5 * mean.float().pow(2).sum((1, 2, 3)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())  # host-device sync, once per step
        if on_step is not None:
            on_step(losses[-1])
    vae.requires_grad_(False).eval()
    _fix_posterior_log_variance(vae, -30.0)
    with torch.no_grad():
        std = torch.cat([vae.encode(chunk * 2 - 1).latent_dist.mean for chunk in images.split(batch_size)]).std()
    vae.register_to_config(scaling_factor=float(1.0 / std))
    return losses


def _fix_posterior_log_variance(vae: AutoencoderKL, log_variance: float) -> None:
    """Make the layer that emits the posterior's moments (``quant_conv``, else the encoder's ``conv_out``)
    output a constant ``log_variance`` in its second half of channels: a deterministic encoder."""
    layer = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    half = layer.out_channels // 2
    with torch.no_grad():
        layer.weight[half:].zero_()
        layer.bias[half:].fill_(log_variance)
