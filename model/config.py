"""Typed configs of the MM-Interleaved model and its two presets.

Every module takes one of these dataclasses and nothing global. The whole model's config is
:class:`MMInterleavedConfig`; it serialises to JSON (``to_dict`` / ``from_dict``) and is written
as ``config.json`` beside the weights.

Presets:

- :meth:`MMInterleavedConfig.tiny`: every component built from a config dict with random
  initialisation (a few M parameters, CPU, seconds per step). Used by the tests and the embedded
  default.
- :meth:`MMInterleavedConfig.small`: the same built wider and at 64 px (~6M parameters, ~3x tiny's step time).
- :meth:`MMInterleavedConfig.paper`: the paper's sizes (Tab. 9) with the frozen parts (CLIP ViT,
  the LLM, Stable Diffusion's UNet/VAE/scheduler) loaded from *local* paths, gradient checkpointing on
  and UNet micro-batches of 8 images. No code path downloads anything.
- :meth:`MMInterleavedConfig.paper_architecture`: ``paper`` with random weights in the published shapes,
  for memory and FLOP planning (:mod:`pipelines.training.budget`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class MMFSConfig:
    """Multi-Modal Feature Synchronizer hyper-parameters (one MMFS block)."""

    num_heads: int = 16
    """Attention heads M; ``hidden_size`` must be divisible by it."""
    num_points: int = 8
    """Sampling points P per head, image and level."""
    hidden_size: int = 1024
    """Width of the projected values (``M * head_dim``)."""
    offset_init: float = 3.0
    """Sampling offsets' bias is drawn from ``uniform(-offset_init, offset_init)`` (base pixels)."""
    base_spatial_shape: int | None = 16
    """Offsets are in pixels of a ``base x base`` map, i.e. the same normalised offset at every level; ``None``: in
    pixels of the query map itself (queries that are a map's pixels only: the UNet's MMFS, as the release)."""
    max_images: int = 50
    """Largest relative image position with its own embedding (larger ones are clamped)."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"MMFS hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_points < 1 or self.max_images < 1 or (self.base_spatial_shape is not None and self.base_spatial_shape < 1):
            raise ValueError("MMFS num_points, base_spatial_shape and max_images must be >= 1")


@dataclass
class ResamplerConfig:
    """Perceiver-style resampler: ``num_queries`` learned queries cross-attend to the inputs."""

    num_queries: int = 64
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    output_init_std: float | None = None
    """Std of the output projection's init (``None``: PyTorch default). The paper uses 1e-3 for
    the visual tokens so that they start small next to the LLM's word embeddings."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"resampler hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


PYRAMIDS = ("vit_adapter", "simple")


@dataclass
class ViTAdapterConfig:
    """ViT-Adapter (Chen et al. 2022) as the MM-Interleaved release uses it: a convolutional stem on the pixels gives
    maps at 4x, 2x, 1x and 1/2x the ViT's patch grid, which interact with the frozen ViT through deformable attention
    (:mod:`model.vit_adapter`)."""

    layers: tuple[int, ...] | None = None
    """ViT layers (0-based) that end an interaction: the injector runs before the layers up to one, the extractors after
    it (the release: 5, 11, 17, 23 of ViT-L's 24). ``None``: four evenly spaced (one per layer for a ViT of fewer); the
    last must be the ViT's last layer."""
    num_heads: int = 16
    """Heads of every deformable attention; ``value_ratio`` x the ViT's width must be divisible by it."""
    num_points: int = 4
    """Sampling points per head and level."""
    stem_channels: int = 64
    """Channels of the stem's 1/4 map (1/8: twice, 1/16 and 1/32: four times), before each is projected to the ViT's
    width."""
    value_ratio: float = 0.5
    """Width of the attentions' projected values, relative to the ViT's width."""
    ffn_ratio: float = 0.25
    """Hidden width of the extractors' convolutional FFN, relative to the ViT's width."""
    final_extractors: int = 3
    """Extractors of the last interaction (the release adds two to its one)."""

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
            if not self.layers or any(b <= a for a, b in zip(self.layers, self.layers[1:])) or self.layers[0] < 0:
                raise ValueError(f"adapter layers {self.layers} must be non-negative and strictly increasing")
        if min(self.num_heads, self.num_points, self.stem_channels, self.final_extractors) < 1:
            raise ValueError("adapter num_heads, num_points, stem_channels and final_extractors must be >= 1")
        if self.value_ratio <= 0 or self.ffn_ratio <= 0:
            raise ValueError("adapter value_ratio and ffn_ratio must be > 0")


@dataclass
class VisionConfig:
    """Image tokenizer: frozen open_clip ViT -> feature pyramid -> resampler -> visual tokens."""

    clip_model: str | dict[str, Any] = "ViT-L-14"
    """An open_clip model name (a shipped or ``open_clip.add_model_config`` config) or the config
    dict itself (``{"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}}``)."""
    clip_checkpoint: str | None = None
    """Local CLIP weights: an open_clip state dict (``.safetensors``, ``.bin``, ``.pt``) or a Hugging Face
    ``CLIPModel`` / ``CLIPVisionModel`` folder (see ``model.clip_weights``); ``None``: random init, for
    models trained from scratch only (the ViT is frozen)."""
    pyramid: str = "vit_adapter"
    """How the multi-scale maps are made: ``"vit_adapter"`` (the paper's, :attr:`adapter`; its maps carry detail finer
    than a patch) or ``"simple"`` (learned resamplings of the last ViT layer's grid, :class:`model.vision.SimplePyramid`)."""
    adapter: ViTAdapterConfig = field(default_factory=ViTAdapterConfig)
    """The ViT-Adapter's sizes (``pyramid="vit_adapter"`` only)."""
    pyramid_channels: int = 1024
    """Channels of every pyramid level (the MMFS value input); the ViT-Adapter's are the ViT's width."""
    pyramid_scales: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)
    """Level sizes relative to the ViT patch grid, largest first (the ViT-Adapter makes all four)."""
    resampler: ResamplerConfig = field(default_factory=lambda: ResamplerConfig(output_init_std=1e-3))
    train_vit: bool = False
    """Train the ViT's weights too (the paper freezes its pretrained CLIP ViT). For a randomly initialised ViT: frozen,
    its patch tokens are fixed random projections of the patches, and the visual tokens made from them lose what the
    trained pyramid keeps (see :meth:`MMInterleavedConfig.from_scratch`)."""

    def __post_init__(self) -> None:
        if isinstance(self.resampler, dict):
            self.resampler = ResamplerConfig(**self.resampler)
        if isinstance(self.adapter, dict):
            self.adapter = ViTAdapterConfig(**self.adapter)
        self.pyramid_scales = tuple(float(s) for s in self.pyramid_scales)
        for scale in self.pyramid_scales:
            if scale not in (4.0, 2.0, 1.0, 0.5):
                raise ValueError(f"pyramid scale {scale} is not one of 4, 2, 1, 0.5")
        if self.pyramid not in PYRAMIDS:
            raise ValueError(f"vision.pyramid must be one of {PYRAMIDS}, got {self.pyramid!r}")
        if self.pyramid == "vit_adapter" and self.pyramid_scales != (4.0, 2.0, 1.0, 0.5):
            raise ValueError(f"the ViT-Adapter makes the levels (4, 2, 1, 0.5), not {self.pyramid_scales}")

    @property
    def num_visual_tokens(self) -> int:
        return self.resampler.num_queries


@dataclass
class LanguageConfig:
    """The MMFS-augmented causal LM."""

    llm_config: dict[str, Any] | None = None
    """A transformers config dict (with ``model_type``) to build a randomly initialised LLM."""
    llm_path: str | None = None
    """A local ``save_pretrained`` directory of any ``AutoModelForCausalLM`` (wins over ``llm_config``)."""
    tokenizer_path: str | None = None
    """Local tokenizer directory; defaults to ``llm_path``."""
    freeze_llm: bool = True
    """Freeze the base LLM (the paper). New tokens always get trainable embeddings and head rows."""
    cross_attention_frequency: int = 4
    """MMFS after the self-attention of every layer with ``index % frequency == 0``; 0 disables MMFS."""
    mmfs: MMFSConfig = field(default_factory=MMFSConfig)
    feature_levels: tuple[int, ...] = (1, 2, 3)
    """Indices into the vision pyramid used by the LLM's MMFS (paper: 32², 16², 8²)."""
    attention_module: str = "self_attn"
    """Name of the self-attention submodule of each decoder layer."""
    boi_token: str = "<|beginofimage|>"
    image_token: str = "<|image|>"

    def __post_init__(self) -> None:
        if isinstance(self.mmfs, dict):
            self.mmfs = MMFSConfig(**self.mmfs)
        self.feature_levels = tuple(int(i) for i in self.feature_levels)
        if self.llm_config is None and self.llm_path is None:
            raise ValueError("LanguageConfig needs llm_config (random init) or llm_path (local weights)")
        if self.cross_attention_frequency < 0:
            raise ValueError("cross_attention_frequency must be >= 0")
        if self.mmfs.base_spatial_shape is None:
            raise ValueError("language.mmfs.base_spatial_shape must be a number: text queries have no map of their own")


CONDITION_LAYERS = ("last", "all")
CONTEXT_POSITIONS = ("from_boi", "from_start")
NEGATIVE_INITS = ("empty_prompt", "random")


@dataclass
class DecoderConfig:
    """Diffusion image decoder: UNet + VAE + scheduler, a condition resampler and MMFS blocks."""

    diffusion_path: str | None = None
    """Local Stable-Diffusion-layout directory (``unet/``, ``vae/``, ``scheduler/``); wins over the dicts."""
    unet_config: dict[str, Any] | None = None
    vae_config: dict[str, Any] | None = None
    scheduler_config: dict[str, Any] | None = None
    condition: ResamplerConfig | None = field(default_factory=lambda: ResamplerConfig(num_queries=77, num_layers=1))
    """Maps LLM hidden states (document start .. ``<BoI>``) to the UNet's condition tokens (the paper: a
    1-layer Q-Former with 77 queries); ``None``: one condition token per context token
    (:mod:`model.condition`)."""
    context_positions: str = "from_boi"
    """1-D sin-cos positions of the context tokens the resampled condition reads: ``"from_boi"`` counts back from
    ``<BoI>`` (position 0, the release's reversed context) or ``"from_start"`` counts from the document start."""
    condition_rms: float = 4.0
    """Per-token condition (``condition=None``) only: the RMS its tokens start at (an RMSNorm with a learned gain
    initialised here ends :class:`~model.condition.TokenCondition`). See :mod:`model.condition` for why 4."""
    condition_layers: str = "last"
    """LLM states the condition reads: ``"last"`` (the final normalised hidden states, the paper) or ``"all"``
    (a learned mix of the embeddings and every layer's output; for LLMs trained from scratch, whose last
    layer drops what next-token prediction no longer needs)."""
    mmfs: MMFSConfig | None = field(default_factory=lambda: MMFSConfig(offset_init=1.0, base_spatial_shape=None))
    """MMFS on every skip connection (see ``mmfs_conv_in``) and the mid block, offsets in pixels of the skip's own map (the
    release) unless ``base_spatial_shape`` is set; ``None``: no MMFS."""
    mmfs_conv_in: bool = True
    """MMFS on ``conv_in``'s output too, the UNet's first skip connection (the release: 12 skip blocks + mid for
    SD-2.1); ``False``: on the down blocks' skips only."""
    feature_levels: tuple[int, ...] = (0, 1, 2, 3)
    """Indices into the vision pyramid used by the UNet's MMFS (paper: 64²..8²)."""
    condition_dropout: float = 0.1
    """Probability of replacing the condition by the learned negative one in training (CFG)."""
    negative_init: str = "empty_prompt"
    """The learned negative condition starts as ``"empty_prompt"``'s condition (the LLM's states of the document start
    and ``<BoI>`` alone through the condition encoder, as the release starts from Stable Diffusion's empty-prompt
    embedding; needs ``condition``, whose width it has) or ``"random"`` (normal, std 0.02)."""
    timestep_bias: float = 0.0
    """Training timesteps are drawn with density proportional to ``t ** timestep_bias`` over ``[0, T)``: 0 is uniform
    (Stable Diffusion's training); 1 rises linearly to the noisiest steps, where a scene's layout and colours are
    decided and the condition matters most (the aim of P2 weighting, Choi et al. 2022, reached by sampling instead of
    loss weights). See :mod:`model.condition` for what it did to a decoder trained from scratch."""
    noise_draws: int = 1
    """(Noise, timestep) draws per trained image per step: the UNet runs on each image this many times while the
    vision encoder, LLM and condition run once, so the decoder sees more denoising examples of each caption for a
    fraction of a step's cost (1: Stable Diffusion's training, one draw)."""
    freeze_unet: bool = False
    unet_micro_batch: int | None = None
    """Trained images per UNet call in the diffusion loss (``None``: all of a batch's in one call). Noise, timesteps
    and condition dropout are drawn for all images first, so the loss does not depend on it; what it bounds is the
    memory of one call (and, with gradient checkpointing, of one recomputation in the backward)."""

    def __post_init__(self) -> None:
        if isinstance(self.condition, dict):
            self.condition = ResamplerConfig(**self.condition)
        if isinstance(self.mmfs, dict):
            self.mmfs = MMFSConfig(**self.mmfs)
        self.feature_levels = tuple(int(i) for i in self.feature_levels)
        if self.negative_init not in NEGATIVE_INITS:
            raise ValueError(f"decoder.negative_init must be one of {NEGATIVE_INITS}, got {self.negative_init!r}")
        if self.negative_init == "empty_prompt" and self.condition is None:
            raise ValueError("decoder.negative_init='empty_prompt' needs decoder.condition (a resampler): the per-token "
                             "condition's one-token negative is no prompt's condition; use 'random'")
        if self.context_positions not in CONTEXT_POSITIONS:
            raise ValueError(f"decoder.context_positions must be one of {CONTEXT_POSITIONS}, got {self.context_positions!r}")
        if self.noise_draws < 1:
            raise ValueError(f"decoder.noise_draws must be at least 1, got {self.noise_draws}")
        if self.condition_layers not in CONDITION_LAYERS:
            raise ValueError(f"decoder.condition_layers must be one of {CONDITION_LAYERS}, got {self.condition_layers!r}")
        if self.diffusion_path is None and (self.unet_config is None or self.vae_config is None):
            raise ValueError("DecoderConfig needs diffusion_path or both unet_config and vae_config")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError("condition_dropout must be in [0, 1)")
        if self.condition_rms <= 0:
            raise ValueError(f"condition_rms must be > 0, got {self.condition_rms}")
        if self.timestep_bias < 0:
            raise ValueError(f"decoder.timestep_bias must be >= 0, got {self.timestep_bias}")
        if self.unet_micro_batch is not None and self.unet_micro_batch < 1:
            raise ValueError(f"decoder.unet_micro_batch must be >= 1 or None, got {self.unet_micro_batch}")


@dataclass(frozen=True)
class OptimizerGroups:
    """Learning rates and weight decay of :meth:`~model.mm_interleaved.MMInterleaved.parameter_groups`; the defaults are
    the public release's. Gates, sampling offsets, norms, biases and other 1-D parameters are never weight-decayed."""

    lr: float = 1e-4
    """Everything trained but the UNet and the sampling offsets: the vision side, the LLM's new parts and (unless
    ``new_decoder_lr``) the decoder's new modules: its condition encoder, its MMFS blocks and the CFG negative."""
    decoder_lr: float = 1e-5
    """The UNet (pretrained Stable Diffusion in the release)."""
    new_decoder_lr: float | None = None
    """The decoder's new modules; ``None``: ``lr`` (the release)."""
    offsets_lr: float | None = 1e-5
    """Every MMFS ``sampling_offsets`` (the LLM's and the UNet's); ``None``: the rate of the module they belong to."""
    weight_decay: float = 0.05


@dataclass(frozen=True)
class ScratchSizes:
    """Sizes of a model built from scratch (:meth:`MMInterleavedConfig.from_scratch`); the defaults are ``tiny``'s."""

    image_size: int = 32
    """Side in pixels of the images the ViT reads and the decoder draws."""
    vit_width: int = 32
    vit_layers: int = 2
    llm_width: int = 64
    llm_layers: int = 4
    unet_channels: tuple[int, int] = (32, 64)
    """The UNet's two levels; the first is also the width of the condition, the pyramid and every MMFS (the ViT-Adapter's
    maps have the ViT's width, so ``vit_width`` must equal it)."""
    vae_channels: tuple[int, ...] = (16, 32)
    """One VAE level per entry: latents are ``image_size / 2**(len - 1)`` on a side."""
    mmfs_base: int = 4
    """MMFS offsets are in pixels of a ``mmfs_base``-square map (:attr:`MMFSConfig.base_spatial_shape`)."""


IMAGE_LOSS_AVERAGES = ("all_images", "trained_images")


@dataclass
class MMInterleavedConfig:
    """The whole model."""

    vision: VisionConfig
    language: LanguageConfig
    decoder: DecoderConfig
    text_loss_weight: float = 1.0
    image_loss_weight: float = 10.0
    image_loss_average: str = "all_images"
    """What the image loss is averaged over: ``"all_images"`` of the batch, those without a context (not trained)
    counting as zeros (the release; on pair data with the image first half the time, half the weight of
    ``"trained_images"``), or ``"trained_images"`` only."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward instead of keeping them: the LLM's decoder layers (their MMFS
    included), the vision pyramid (the ViT-Adapter's stem and each interaction, the frozen ViT layers it runs
    included; the simple pyramid's levels), every resampler layer, the UNet's blocks and its MMFS skips. Same losses
    and gradients, about one more forward of compute."""

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.language, dict):
            self.language = LanguageConfig(**self.language)
        if isinstance(self.decoder, dict):
            self.decoder = DecoderConfig(**self.decoder)
        if self.image_loss_average not in IMAGE_LOSS_AVERAGES:
            raise ValueError(f"image_loss_average must be one of {IMAGE_LOSS_AVERAGES}, got {self.image_loss_average!r}")
        num_levels = len(self.vision.pyramid_scales)
        for name, levels in (("language", self.language.feature_levels), ("decoder", self.decoder.feature_levels)):
            if not levels or any(not 0 <= i < num_levels for i in levels):
                raise ValueError(f"{name}.feature_levels {levels} must index the {num_levels} pyramid levels")

    @property
    def num_visual_tokens(self) -> int:
        return self.vision.num_visual_tokens

    # serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MMInterleavedConfig":
        return cls(**data)

    def save(self, path: str | Path, saved_format: int | None = None) -> None:
        """Write the config as JSON; a saved model folder's also names its ``"format"`` (:mod:`model.saved_format`)."""
        data = self.to_dict() if saved_format is None else {**self.to_dict(), "format": saved_format}
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "MMInterleavedConfig":
        """A config file, or a saved model folder's ``config.json`` (its ``"format"`` ignored: missing options take
        today's defaults here; :meth:`MMInterleaved.from_pretrained` reads old folders as they were written)."""
        data = json.loads(Path(path).read_text())
        data.pop("format", None)
        return cls.from_dict(data)

    # presets -------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, num_visual_tokens: int = 8, vocab_size: int = 512, mmfs: bool = True) -> "MMInterleavedConfig":
        """Random-init model with a few M parameters: 32-px images, a 4-layer LLM of width 64."""
        return cls.from_scratch(ScratchSizes(), num_visual_tokens, vocab_size, mmfs)

    @classmethod
    def small(cls, num_visual_tokens: int = 16, vocab_size: int = 512, mmfs: bool = True) -> "MMInterleavedConfig":
        """64-px images through an 8x8 ViT grid, a 6-layer LLM of width 128, a UNet of 64/128 channels on 16x16 latents (a
        VAE that downsamples 4x). On 2,000 separate caption-image pairs, 16 a step for 1,000 steps, it drew at attribute
        accuracy 0.24 where ``tiny`` drew 0.70 (2026-11-30), so the quality recipe trains ``tiny``."""
        sizes = ScratchSizes(image_size=64, vit_width=64, vit_layers=4, llm_width=128, llm_layers=6,
                             unet_channels=(64, 128), vae_channels=(32, 64, 64), mmfs_base=8)
        return cls.from_scratch(sizes, num_visual_tokens, vocab_size, mmfs)

    @classmethod
    def from_scratch(cls, sizes: "ScratchSizes", num_visual_tokens: int, vocab_size: int, mmfs: bool) -> "MMInterleavedConfig":
        """Every component built from a config dict of ``sizes`` with random initialisation (no pretrained part)."""
        vit_head = min(sizes.vit_width // 2, 32)
        clip = {
            "embed_dim": sizes.vit_width,
            "vision_cfg": {"image_size": sizes.image_size, "layers": sizes.vit_layers, "width": sizes.vit_width,
                           "patch_size": 8, "head_width": vit_head},
            "text_cfg": {"context_length": 8, "vocab_size": 16, "width": 16, "heads": 2, "layers": 1},
        }
        llm = {
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": sizes.llm_width,
            "intermediate_size": 2 * sizes.llm_width,
            "num_hidden_layers": sizes.llm_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
        }
        latent_scale = 2 ** (len(sizes.vae_channels) - 1)
        cross_dim = sizes.unet_channels[0]
        unet = {
            "sample_size": sizes.image_size // latent_scale,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": list(sizes.unet_channels),
            "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": cross_dim,
            "attention_head_dim": 8,  # diffusers reads this as the number of heads: 8, see model.condition
            "norm_num_groups": 8,
        }
        vae = {
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "block_out_channels": list(sizes.vae_channels),
            "down_block_types": ["DownEncoderBlock2D"] * len(sizes.vae_channels),
            "up_block_types": ["UpDecoderBlock2D"] * len(sizes.vae_channels),
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "sample_size": sizes.image_size,
        }
        # Stable Diffusion's betas rescaled to zero terminal SNR, v-prediction, DDIM from the last timestep: see
        # model.image_decoder's docstring for what the original schedule did to these small latents (and the runs).
        scheduler = {**SD21_BASE_SCHEDULER, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                     "timestep_spacing": "trailing"}
        mmfs_small = dict(num_heads=4, num_points=2, hidden_size=cross_dim, base_spatial_shape=sizes.mmfs_base, max_images=8)
        return cls(
            vision=VisionConfig(
                clip_model=clip,
                adapter=ViTAdapterConfig(num_heads=4, stem_channels=16),
                pyramid_channels=cross_dim,
                resampler=ResamplerConfig(num_queries=num_visual_tokens, hidden_size=cross_dim, num_layers=2, num_heads=2, mlp_ratio=2.0, output_init_std=1e-3),
            ),
            language=LanguageConfig(
                llm_config=llm,
                freeze_llm=False,
                cross_attention_frequency=2 if mmfs else 0,
                mmfs=MMFSConfig(offset_init=1.0, **mmfs_small),
                boi_token="<BoI>",
                image_token="<image>",
            ),
            decoder=DecoderConfig(
                unet_config=unet,
                vae_config=vae,
                scheduler_config=scheduler,
                condition=None,  # per-token over every layer: see model.condition for what the 16-query resampler cost
                condition_layers="all",
                negative_init="random",  # a per-token condition has no empty-prompt negative of its width
                # offsets in pixels of an mmfs_base map (mmfs_small), as the demo was measured, not of each skip's map
                mmfs=MMFSConfig(offset_init=0.5, **mmfs_small) if mmfs else None,
                mmfs_conv_in=False,  # as the demo was measured: the down blocks' skips only
                timestep_bias=1.0,  # from scratch the decoder learns its condition from the noisy steps: model.condition
            ),
            image_loss_average="trained_images",  # as the demo was measured: "all_images" halves the image loss on pairs
            # the v loss is ~10x the epsilon loss at the same text loss: at the release's 10 the captioner collapsed
            # (quality recipe CIDEr 0.00; at 1, 1.12): model.image_decoder's docstring
            image_loss_weight=1.0,
        )

    @classmethod
    def paper(
        cls,
        llm_path: str,
        diffusion_path: str,
        clip_checkpoint: str,
        clip_model: str | dict[str, Any] = "ViT-L-14-quickgelu",
        tokenizer_path: str | None = None,
        num_visual_tokens: int = 64,
    ) -> "MMInterleavedConfig":
        """Tab. 9: CLIP ViT-L/14 + Vicuna-13B + SD 2.1, all loaded from local paths; gradient checkpointing on and
        UNet micro-batches of 8 images (``python -m pipelines.training.budget`` plans its memory: it fits 80 GB GPUs
        with checkpointing, not without).

        ``clip_checkpoint`` is required: the ViT is frozen, so a random one would stay random. The default
        ``clip_model`` is OpenAI's ViT-L/14 (QuickGELU), whose weights the paper uses
        (``openai/clip-vit-large-patch14``); other weights need their own config (e.g. ``ViT-L-14``).
        """
        if not clip_checkpoint:
            raise ValueError("the paper preset needs clip_checkpoint: its frozen ViT must be pretrained weights")
        return cls._paper(
            dict(llm_path=llm_path, tokenizer_path=tokenizer_path),
            dict(diffusion_path=diffusion_path),
            clip_model,
            clip_checkpoint,
            num_visual_tokens,
        )

    @classmethod
    def paper_architecture(cls, num_visual_tokens: int = 64) -> "MMInterleavedConfig":
        """The :meth:`paper` preset with every pretrained part randomly initialised in its published shape
        (:data:`VICUNA_13B`, :data:`SD21_BASE_UNET` / ``_VAE`` / ``_SCHEDULER``, open_clip's ViT-L-14-quickgelu): no
        file is read. For planning memory and compute (:mod:`pipelines.training.budget`), never for training: its
        frozen ViT is random."""
        return cls._paper(
            dict(llm_config=VICUNA_13B),
            dict(unet_config=SD21_BASE_UNET, vae_config=SD21_BASE_VAE, scheduler_config=SD21_BASE_SCHEDULER),
            "ViT-L-14-quickgelu",
            None,
            num_visual_tokens,
        )

    @classmethod
    def _paper(cls, llm: dict[str, Any], diffusion: dict[str, Any], clip_model: str | dict[str, Any],
               clip_checkpoint: str | None, num_visual_tokens: int) -> "MMInterleavedConfig":
        """The paper's sizes around the LLM (``LanguageConfig`` source fields) and diffusion model (``DecoderConfig``'s)."""
        return cls(
            vision=VisionConfig(
                clip_model=clip_model,
                clip_checkpoint=clip_checkpoint,
                adapter=ViTAdapterConfig(layers=(5, 11, 17, 23)),  # the release's interactions
                pyramid_channels=1024,
                resampler=ResamplerConfig(num_queries=num_visual_tokens, hidden_size=768, num_layers=12, num_heads=12, output_init_std=1e-3),
            ),
            language=LanguageConfig(
                **llm,
                freeze_llm=True,
                cross_attention_frequency=4,
                mmfs=MMFSConfig(num_heads=16, num_points=8, hidden_size=1024, offset_init=3.0, base_spatial_shape=16),
                feature_levels=(1, 2, 3),
            ),
            decoder=DecoderConfig(
                **diffusion,
                condition=ResamplerConfig(num_queries=77, hidden_size=1024, num_layers=1, num_heads=16),
                mmfs=MMFSConfig(num_heads=16, num_points=8, hidden_size=1024, offset_init=1.0, base_spatial_shape=None),
                feature_levels=(0, 1, 2, 3),
                unet_micro_batch=8,  # python -m pipelines.training.budget: the lowest activation peak of 1, 4, 8 and all (30)
            ),
            gradient_checkpointing=True,
        )


# The published architectures of the paper preset's pretrained parts (their config.json files on the Hugging Face
# hub: lmsys/vicuna-13b-v1.3 and stabilityai/stable-diffusion-2-1-base), for MMInterleavedConfig.paper_architecture.
VICUNA_13B: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
SD21_BASE_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "norm_num_groups": 32,
}
SD21_BASE_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD21_BASE_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "steps_offset": 1,
}
