"""MM-Interleaved: image tokenizer + MMFS-augmented LLM + MMFS-augmented diffusion decoder.

``forward(batch)`` returns the training losses; ``generate(prompt)`` continues an interleaved
prompt autoregressively, producing an image whenever ``<BoI>`` is emitted and feeding it back as
context. Checkpoints are ``config.json`` + ``model.safetensors`` + ``tokenizer/``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerBase

from model.batch import ImageLayout, InterleavedBatch, encode_document, tensor_to_image
from model.config import LanguageConfig, MMInterleavedConfig, OptimizerGroups
from model.image_decoder import DecoderContext, ImageDecoder
from model.language import LanguageModelOutput, MMFSContext, MMFSLanguageModel, document_causal_mask, positions_in_document
from model.mmfs import ImageFeatures, flatten_feature_maps, visibility_and_relative_position
from model.saved_format import SAVED_FORMAT, saved_config, saved_weights
from model.tokenizer import add_multimodal_tokens
from model.vision import ImageTokenizer, VisionOutput

IGNORE_INDEX = -100


@dataclass
class MMInterleavedOutput:
    """Attributes:
    loss: scalar, ``text_loss_weight * text_loss + image_loss_weight * image_loss``.
    text_loss: scalar next-token cross-entropy over trained tokens.
    image_loss: scalar diffusion MSE summed over trained images, divided by the batch's images or the trained ones
        (``config.image_loss_average``); 0 when none is trained.
    logits: ``(B, T, V)``.
    num_trained_images: images that contributed to ``image_loss``.
    """

    loss: Tensor
    text_loss: Tensor
    image_loss: Tensor
    logits: Tensor
    num_trained_images: int


@dataclass
class GenerationOutput:
    """Attributes:
    text: all generated text (special tokens removed).
    images: generated images in order.
    elements: the generated continuation as alternating text and images.
    token_ids: the full token sequence (prompt + generation, placeholders included).
    """

    text: str
    images: list[Image.Image]
    elements: list[str | Image.Image] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


def build_llm(config: LanguageConfig, vocab_size: int) -> nn.Module:
    """Local pretrained weights (``llm_path``) or random init from ``llm_config``; never a download."""
    if config.llm_path is not None:
        return AutoModelForCausalLM.from_pretrained(config.llm_path, local_files_only=True)
    llm_config = dict(config.llm_config)
    model_type = llm_config.pop("model_type")
    llm_config["vocab_size"] = max(llm_config.get("vocab_size", 0), vocab_size)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **llm_config))


class MMInterleaved(nn.Module):
    """The whole model. Build with :meth:`from_config` or :meth:`from_pretrained`."""

    config_name = "config.json"
    weights_name = "model.safetensors"
    tokenizer_dir = "tokenizer"

    def __init__(self, config: MMInterleavedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.boi_token_id, self.image_token_id = add_multimodal_tokens(
            tokenizer, config.language.boi_token, config.language.image_token
        )
        vocab_size = len(tokenizer)
        llm = build_llm(config.language, vocab_size)
        hidden_size = llm.get_input_embeddings().embedding_dim
        self.vision = ImageTokenizer(config.vision, hidden_size)
        feature_dim = self.vision.feature_channels
        self.language = MMFSLanguageModel(
            config.language,
            llm,
            feature_dim,
            len(config.language.feature_levels),
            [self.boi_token_id, self.image_token_id],
            vocab_size,
        )
        num_llm_states = llm.config.num_hidden_layers + 1 if config.decoder.condition_layers == "all" else 1
        self.decoder = ImageDecoder(config.decoder, hidden_size, feature_dim, len(config.decoder.feature_levels), num_llm_states)
        if config.decoder.negative_init == "empty_prompt":
            with torch.no_grad():
                self.decoder.negative_condition.copy_(self.empty_prompt_condition())
        if config.gradient_checkpointing:
            for part in (self.vision, self.language, self.decoder):
                part.enable_gradient_checkpointing()

    @classmethod
    def from_config(cls, config: MMInterleavedConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> "MMInterleaved":
        """Build from a config; the tokenizer defaults to the local ``tokenizer_path``/``llm_path``."""
        if tokenizer is None:
            path = config.language.tokenizer_path or config.language.llm_path
            if path is None:
                raise ValueError("a tokenizer is required when the config has no tokenizer_path/llm_path")
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(config, tokenizer)

    @property
    def num_visual_tokens(self) -> int:
        return self.config.num_visual_tokens

    @property
    def image_size(self) -> tuple[int, int]:
        return self.decoder.image_size

    @property
    def device(self) -> torch.device:
        return self.decoder.negative_condition.device

    # pieces shared by forward and generate --------------------------------------------------
    def _layout(self, input_ids: Tensor, document_ids: Tensor) -> ImageLayout:
        return ImageLayout.from_tokens(input_ids, document_ids, self.boi_token_id, self.image_token_id, self.num_visual_tokens)

    def _embed(self, input_ids: Tensor, layout: ImageLayout, vision: VisionOutput | None) -> Tensor:
        """Token embeddings with each image's placeholders replaced by its visual tokens."""
        embeds = self.language.embed_tokens(input_ids)
        if vision is None or layout.num_images == 0:
            return embeds
        n = self.num_visual_tokens
        positions = layout.boi_position[:, None] + torch.arange(1, n + 1, device=input_ids.device)
        rows = layout.row[:, None].expand(-1, n)
        tokens = vision.visual_tokens.to(embeds.dtype)
        return embeds.index_put((rows.reshape(-1), positions.reshape(-1)), tokens.reshape(-1, tokens.shape[-1]))

    @staticmethod
    def _gathered_features(maps: list[Tensor], levels: Sequence[int], images: Tensor, valid: Tensor) -> ImageFeatures:
        """Selected pyramid levels of the images ``images (..., K)`` (indices into the batch's images), zero where
        ``valid (..., K)`` is False: values ``(..., K, S, C)``."""
        flat, spatial_shapes, level_start_index = flatten_feature_maps([maps[i] for i in levels])  # (K_all, S, C)
        values = flat[images.clamp(min=0)] * valid[..., None, None].to(flat.dtype)
        return ImageFeatures(values, spatial_shapes, level_start_index)

    @classmethod
    def _row_features(cls, maps: list[Tensor], levels: Sequence[int], layout: ImageLayout) -> ImageFeatures:
        """Selected pyramid levels of every image, gathered per row slot: values ``(B, K_max, S, C)``."""
        return cls._gathered_features(maps, levels, layout.row_images, layout.slot_valid)

    def _llm_context(self, document_ids: Tensor, positions: Tensor, layout: ImageLayout | None,
                     vision: VisionOutput | None) -> MMFSContext | None:
        """MMFS context for the tokens at ``positions (B, Tq)`` with documents ``document_ids (B, Tq)`` (``layout``
        may be ``None`` without ``vision``)."""
        if not self.language.mmfs_layers:
            return None
        if vision is None or layout.num_images == 0:
            b, t = document_ids.shape
            none = torch.zeros(b, t, 0, dtype=torch.bool, device=document_ids.device)
            return MMFSContext(self._no_image_features(b, self.config.language.feature_levels), none, none.long())
        features = self._row_features(vision.feature_maps, self.config.language.feature_levels, layout)
        visible, relative = visibility_and_relative_position(
            document_ids, positions, layout.slot_document, layout.slot_start, layout.slot_valid
        )
        return MMFSContext(features, visible, relative)

    def _no_image_features(self, batch_size: int, levels: Sequence[int]) -> ImageFeatures:
        """Zero image slots: every query's MMFS weight goes to the sink."""
        c, device = self.vision.feature_channels, self.device
        shapes = torch.ones(len(levels), 2, dtype=torch.long, device=device)
        return ImageFeatures(torch.zeros(batch_size, 0, len(levels), c, device=device), shapes, torch.arange(len(levels), device=device))

    def _decoder_context(self, vision: VisionOutput, layout: ImageLayout, targets: Tensor) -> DecoderContext:
        """Previous images of the same document for each image index in ``targets (N,)``: values ``(N, K_vis, S, C)``
        with ``K_vis`` the most earlier images any target sees, not all ``K_max`` image slots of the rows.

        Each target's visible images come first, in slot order (so relative positions are unchanged), and the
        remaining slots are invisible zeros. ``K_vis`` is at least 1: a batch whose trained images see nothing then
        still runs the UNet's MMFS (its weights get zero gradients), so every batch with trained images has the same
        autograd graph, which ZeRO-2's gradient reduction needs on every rank.
        """
        rows = layout.row[targets]
        k_max = layout.row_images.shape[1]
        slots = torch.arange(k_max, device=targets.device)
        visible = (
            layout.slot_valid[rows]
            & (layout.slot_document[rows] == layout.document[targets][:, None])
            & (slots[None] < layout.slot[targets][:, None])
        )
        k_vis = max(int(visible.sum(-1).max()), 1)  # host-device sync, once per batch
        order = torch.sort((~visible).to(torch.uint8), dim=-1, stable=True).indices[:, :k_vis]
        visible = visible.gather(-1, order)
        images = layout.row_images[rows].gather(-1, order)
        counts = visible.long()
        relative = counts.flip(-1).cumsum(-1).flip(-1) * counts
        features = self._gathered_features(vision.feature_maps, self.config.decoder.feature_levels, images, visible)
        return DecoderContext(features, visible, relative)

    def _condition_states(self, lm: LanguageModelOutput) -> Tensor:
        """The LLM states the decoder's condition reads: ``(B, T, S, D)``."""
        return lm.hidden_states[:, :, None] if lm.layer_states is None else lm.layer_states

    def _condition_inputs(self, hidden: Tensor, document_ids: Tensor, layout: ImageLayout, targets: Tensor) -> tuple[Tensor, Tensor]:
        """States ``hidden (B, T, ...)`` from each target image's document start to its ``<BoI>``:
        ``(N, W, ...)`` + mask ``(N, W)``."""
        t = document_ids.shape[1]
        starts = torch.arange(t, device=hidden.device) - positions_in_document(document_ids)
        rows, boi = layout.row[targets], layout.boi_position[targets]
        begin = starts[rows, boi]
        lengths = boi - begin + 1
        width = int(lengths.max())
        offsets = torch.arange(width, device=hidden.device)
        index = (begin[:, None] + offsets).clamp(max=t - 1)
        return hidden[rows[:, None], index], offsets[None] < lengths[:, None]

    @torch.no_grad()
    def empty_prompt_condition(self) -> Tensor:
        """The decoder's condition tokens ``(N_cond, C)`` for an image with an empty prompt: the LLM's states of the
        document start (``<s>`` where the tokenizer has one) and ``<BoI>``, the whole context such an image has,
        through the condition encoder. What the release's negative condition starts as (Stable Diffusion's text
        encoder on ``""``)."""
        bos = self.tokenizer.bos_token_id
        ids = torch.tensor([[self.boi_token_id] if bos is None else [bos, self.boi_token_id]], device=self.device)
        docs, positions = torch.zeros_like(ids), torch.arange(ids.shape[1], device=ids.device)[None]
        embeds = self.language.embed_tokens(ids)
        mask = document_causal_mask(docs, positions, docs, positions, embeds.dtype)
        context = self._llm_context(docs, positions, None, None)
        lm = self.language(embeds, mask, positions, context, output_layer_states=self.decoder.layer_mix is not None)
        states = self._condition_states(lm)
        return self.decoder.encode_condition(states, torch.ones(states.shape[:2], dtype=torch.bool, device=ids.device)).tokens[0]

    def _text_targets(self, batch: InterleavedBatch) -> Tensor:
        """``(B, T - 1)`` next-token targets, ignoring placeholders, padding and document crossings."""
        ids, docs = batch.input_ids, batch.document_ids
        labels = ids if batch.labels is None else batch.labels
        targets = labels[:, 1:].clone()
        keep = (docs[:, 1:] == docs[:, :-1]) & (docs[:, 1:] >= 0) & (ids[:, 1:] != self.image_token_id)
        return targets.masked_fill(~keep, IGNORE_INDEX)

    def _image_has_context(self, batch: InterleavedBatch, layout: ImageLayout) -> Tensor:
        """``(K,)`` True when something other than ``<s>`` precedes the image's ``<BoI>`` in its document."""
        ids, docs = batch.input_ids, batch.document_ids
        t = ids.shape[1]
        starts = torch.arange(t, device=ids.device) - positions_in_document(docs)
        begin = starts[layout.row, layout.boi_position]
        preceding = layout.boi_position - begin
        bos = self.tokenizer.bos_token_id
        if bos is not None:
            preceding = preceding - (ids[layout.row, begin] == bos).long()
        keep = preceding >= 1
        if batch.image_loss_mask is not None:
            keep = keep & batch.image_loss_mask.to(keep.device)
        return keep

    # training -------------------------------------------------------------------------------
    def forward(self, batch: InterleavedBatch) -> MMInterleavedOutput:
        """Losses of one packed batch (see :class:`InterleavedBatch` for the contract)."""
        ids, docs = batch.input_ids, batch.document_ids
        b, t = ids.shape
        layout = self._layout(ids, docs)
        if layout.num_images != batch.images.shape[0]:
            raise ValueError(f"{layout.num_images} <BoI> tokens but {batch.images.shape[0]} images")

        # 1. tokenize images
        vision = self.vision(batch.images) if layout.num_images else None

        # 2. LLM with MMFS
        positions = torch.arange(t, device=ids.device).expand(b, t)
        embeds = self._embed(ids, layout, vision)
        mask = document_causal_mask(docs, positions, docs, positions, embeds.dtype)
        lm = self.language(embeds, mask, positions_in_document(docs), self._llm_context(docs, positions, layout, vision),
                           output_layer_states=self.decoder.layer_mix is not None)

        # 3. text loss
        targets = self._text_targets(batch)
        text_loss = F.cross_entropy(lm.logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)

        # 4. diffusion loss for images with preceding context
        image_loss = lm.hidden_states.new_zeros(())
        trained = 0
        if vision is not None:
            targets_k = self._image_has_context(batch, layout).nonzero(as_tuple=True)[0]
            trained = int(targets_k.numel())
            if trained:
                hidden, hidden_mask = self._condition_inputs(self._condition_states(lm), docs, layout, targets_k)
                condition = self.decoder.encode_condition(hidden, hidden_mask)
                context = self._decoder_context(vision, layout, targets_k)
                average_over = layout.num_images if self.config.image_loss_average == "all_images" else trained
                image_loss = self.decoder.loss(batch.images[targets_k], condition, context).sum() / average_over

        loss = self.config.text_loss_weight * text_loss + self.config.image_loss_weight * image_loss
        return MMInterleavedOutput(loss, text_loss, image_loss, lm.logits, trained)

    def parameter_groups(self, settings: OptimizerGroups = OptimizerGroups()) -> list[dict]:
        """Optimizer groups by parameter name (see :class:`~model.config.OptimizerGroups`): ``decoder`` (the UNet) at
        ``decoder_lr``, ``new_decoder`` (the decoder's other trained modules) at ``new_decoder_lr`` or ``lr``,
        ``offsets`` (every MMFS ``sampling_offsets``) at ``offsets_lr``, ``main`` (the rest) at ``lr``; each split into
        decayed and ``_no_decay`` (gates, sampling offsets, norms, biases and other 1-D parameters)."""
        rates = {
            "main": settings.lr,
            "decoder": settings.decoder_lr,
            "new_decoder": settings.lr if settings.new_decoder_lr is None else settings.new_decoder_lr,
            "offsets": settings.offsets_lr,
        }
        groups: dict[tuple[str, bool], dict] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            offsets = ".sampling_offsets." in name
            if offsets and settings.offsets_lr is not None:
                role = "offsets"
            elif name.startswith("decoder.unet."):
                role = "decoder"
            elif name.startswith("decoder."):
                role = "new_decoder"
            else:
                role = "main"
            no_decay = param.ndim < 2 or name.endswith(".gate") or offsets or "norm" in name
            group = groups.setdefault(
                (role, no_decay),
                {
                    "name": f"{role}{'_no_decay' if no_decay and role != 'offsets' else ''}",
                    "params": [],
                    "param_names": [],
                    "lr": rates[role],
                    "weight_decay": 0.0 if no_decay else settings.weight_decay,
                },
            )
            group["params"].append(param)
            group["param_names"].append(name)
        return list(groups.values())

    # generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt: Sequence[str | Image.Image],
        max_new_tokens: int = 64,
        max_new_images: int = 1,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 30,
        do_sample: bool = False,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> GenerationOutput:
        """Continue an interleaved prompt (one document) with text and images.

        Text is decoded token by token with the KV cache. When ``<BoI>`` is produced (or the
        prompt ends with it, which forces an image), the decoder samples an image conditioned on
        the document so far and its previous images; the image is tokenized and fed back as
        context. Stops at ``</s>``, after ``max_new_tokens`` text tokens, or when a
        ``<BoI>`` would exceed ``max_new_images``.
        """
        device = self.device
        boi = self.tokenizer.convert_ids_to_tokens(self.boi_token_id)
        force_image = bool(prompt) and isinstance(prompt[-1], str) and prompt[-1].rstrip().endswith(boi)
        if force_image:
            prompt = [*prompt[:-1], prompt[-1].rstrip()[: -len(boi)]]
        ids, images = encode_document(
            self.tokenizer, prompt, self.boi_token_id, self.image_token_id, self.num_visual_tokens, self.image_size, add_eos=False
        )
        state = _GenerationState(self, ids, [img.to(device) for img in images])
        logits = state.feed(0)
        elements: list[str | Image.Image] = []
        new_images: list[Image.Image] = []
        text_ids: list[int] = []
        all_text: list[int] = []
        for step in range(max_new_tokens + max_new_images):
            if force_image and step == 0:
                token = self.boi_token_id
            else:
                logits[self.image_token_id] = float("-inf")
                if len(new_images) >= max_new_images:
                    logits[self.boi_token_id] = float("-inf")
                token = _next_token(logits, do_sample, temperature, generator)
            if token == self.tokenizer.eos_token_id or (token != self.boi_token_id and len(all_text) >= max_new_tokens):
                break
            state.ids.append(token)
            logits = state.feed(len(state.ids) - 1)
            if token != self.boi_token_id:
                text_ids.append(token)
                all_text.append(token)
                continue
            # the LLM asked for an image: decode it, then feed it back as context
            if text_ids:
                elements.append(self.tokenizer.decode(text_ids, skip_special_tokens=True))
                text_ids = []
            image = state.generate_image(guidance_scale, num_inference_steps, generator)
            new_images.append(tensor_to_image(image))
            elements.append(new_images[-1])
            start = len(state.ids)
            state.ids.extend([self.image_token_id] * self.num_visual_tokens)
            logits = state.feed(start)
        if text_ids:
            elements.append(self.tokenizer.decode(text_ids, skip_special_tokens=True))
        return GenerationOutput(
            text=self.tokenizer.decode(all_text, skip_special_tokens=True),
            images=new_images,
            elements=elements,
            token_ids=list(state.ids),
        )

    @torch.no_grad()
    def text_nats(self, document: Sequence[str | Image.Image]) -> float:
        """The mean cross-entropy (nats per predicted text token) of one interleaved document, ``<s>`` ... ``</s>``,
        scored as training scores it: how likely the model finds a text given the images before it (the same text
        after another image tells whether it reads them). An image first in the document gets no diffusion loss;
        one after text does, with fresh noise, but only the text loss is returned."""
        ids, images = encode_document(self.tokenizer, document, self.boi_token_id, self.image_token_id,
                                      self.num_visual_tokens, self.image_size)
        input_ids = torch.tensor([ids], device=self.device)
        pixels = torch.stack(images).to(self.device) if images else torch.zeros(0, 3, *self.image_size, device=self.device)
        return float(self(InterleavedBatch(input_ids, torch.zeros_like(input_ids), pixels)).text_loss)

    # checkpoints ----------------------------------------------------------------------------
    def _referenced_prefixes(self) -> tuple[str, ...]:
        """Frozen parts that a checkpoint may reference by their local source path instead of copying."""
        prefixes = []
        if self.config.vision.clip_checkpoint is not None and not self.config.vision.train_vit:
            prefixes.append("vision.vit.")
        if self.config.language.llm_path is not None and self.config.language.freeze_llm:
            prefixes.append("language.llm.")
        if self.config.decoder.diffusion_path is not None:
            prefixes.append("decoder.vae.")
        return tuple(prefixes)

    def save_pretrained(self, directory: str | Path, reference_frozen: bool = True) -> None:
        """Write ``config.json``, ``model.safetensors`` and ``tokenizer/``.

        With ``reference_frozen``, frozen parts loaded from a local path (ViT, frozen LLM, VAE)
        are not copied: loading rebuilds them from the same paths recorded in the config.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        skip = self._referenced_prefixes() if reference_frozen else ()
        state = {k: v.detach().contiguous().clone() for k, v in self.state_dict().items() if not k.startswith(skip)}
        save_file(state, str(directory / self.weights_name), metadata={"format": "pt", "referenced": ",".join(skip)})
        self.config.save(directory / self.config_name, saved_format=SAVED_FORMAT)
        self.tokenizer.save_pretrained(directory / self.tokenizer_dir)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "MMInterleaved":
        """Load a :meth:`save_pretrained` directory (safetensors only: no pickle is ever executed); a folder of an
        earlier format loads as the model it was written from (:mod:`model.saved_format`)."""
        directory = Path(directory)
        data, version = saved_config(json.loads((directory / cls.config_name).read_text()))
        config = MMInterleavedConfig.from_dict(data)
        tokenizer = AutoTokenizer.from_pretrained(directory / cls.tokenizer_dir, local_files_only=True)
        model = cls(config, tokenizer)
        state = saved_weights(load_file(str(directory / cls.weights_name), device=str(map_location)), version)
        missing, unexpected = model.load_state_dict(state, strict=False)
        referenced = model._referenced_prefixes()
        missing = [k for k in missing if not k.startswith(referenced)]
        if missing or unexpected:
            raise ValueError(f"checkpoint mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.to(map_location)


def _next_token(logits: Tensor, do_sample: bool, temperature: float, generator: torch.Generator | None) -> int:
    if not do_sample:
        return int(logits.argmax())
    probs = (logits.float() / temperature).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class _GenerationState:
    """One document being generated: tokens, images, the KV cache and the hidden states so far."""

    def __init__(self, model: MMInterleaved, ids: list[int], images: list[Tensor]) -> None:
        self.model = model
        self.ids = ids
        self.images = images
        self.cache = DynamicCache()
        self.hidden: list[Tensor] = []
        self.vision: VisionOutput | None = None
        self._encoded_images = -1

    def _vision(self) -> VisionOutput | None:
        if self._encoded_images != len(self.images):
            self.vision = self.model.vision(torch.stack(self.images)) if self.images else None
            self._encoded_images = len(self.images)
        return self.vision

    def feed(self, start: int) -> Tensor:
        """Run the LLM on ``ids[start:]`` with the cache; return the last token's logits ``(V,)``."""
        model = self.model
        device = model.device
        ids = torch.tensor([self.ids], device=device)
        docs = torch.zeros_like(ids)
        complete = len(self.images) == int((ids == model.boi_token_id).sum())
        layout = model._layout(ids, docs) if complete else model._layout(ids[:, :-1], docs[:, :-1])
        vision = self._vision()
        positions = torch.arange(ids.shape[1], device=device)[None]
        embeds = model._embed(ids, layout, vision)[:, start:]
        new_positions = positions[:, start:]
        mask = document_causal_mask(docs[:, start:], new_positions, docs, positions, embeds.dtype)
        context = model._llm_context(docs[:, start:], new_positions, layout, vision)
        out = model.language(embeds, mask, new_positions, context, past_key_values=self.cache, use_cache=True,
                             output_layer_states=model.decoder.layer_mix is not None)
        self.cache = out.past_key_values
        self.hidden.append(model._condition_states(out))
        return out.logits[0, -1]

    def generate_image(self, guidance_scale: float, steps: int, generator: torch.Generator | None) -> Tensor:
        """Sample the image of the last ``<BoI>`` (which has been fed): ``(3, H, W)``."""
        model = self.model
        hidden = torch.cat(self.hidden, dim=1)  # (1, T, S, D), the whole document so far
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        condition = model.decoder.encode_condition(hidden, mask)
        levels = model.config.decoder.feature_levels
        none = torch.zeros(1, 0, dtype=torch.bool, device=hidden.device)
        context = DecoderContext(model._no_image_features(1, levels), none, none.long())
        if self.images:
            ids = torch.tensor([self.ids[:-1]], device=hidden.device)
            layout = model._layout(ids, torch.zeros_like(ids))
            vision = self._vision()
            features = model._row_features(vision.feature_maps, levels, layout)
            k = len(self.images)
            visible = torch.ones(1, k, dtype=torch.bool, device=hidden.device)
            relative = torch.arange(k, 0, -1, device=hidden.device)[None]
            context = DecoderContext(features, visible, relative)
        image = model.decoder.sample(condition, context, guidance_scale, steps, generator)[0]
        self.images.append(image)
        return image
