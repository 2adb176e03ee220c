"""MMFS-augmented causal LM around any Hugging Face ``AutoModelForCausalLM``.

Nothing of the library's source is copied or edited. MMFS enters every
``cross_attention_frequency``-th decoder layer through two forward hooks:

1. a pre-hook on the decoder layer records its input ``x`` (the residual stream);
2. a hook on the layer's self-attention turns its output ``a`` into
   ``a + tanh(alpha) * MMFS(x + a)``, so the layer continues as ``x + a + gated MMFS`` -> MLP,
   i.e. MMFS sits between self-attention and MLP as its own gated residual block.

The per-forward MMFS inputs travel as an explicit :class:`MMFSContext` keyword argument through
the LLM's ``forward`` (transformers passes extra keyword arguments down to every decoder layer
and attention module), so hooks read it from their call's kwargs: no globals and no state left
on the module, and gradient checkpointing's recomputation sees the same context.

Under gradient checkpointing (:meth:`MMFSLanguageModel.enable_gradient_checkpointing`) transformers
checkpoints each decoder layer's ``forward``, not its ``__call__``: hook 1 runs once, in the forward,
while hook 2 (inside the layer) runs again when the backward recomputes the layer. So hook 2 reads the
recorded input and leaves it in the context for the recomputation; it is the layer's own input, which
the checkpoint keeps for the backward anyway.

New tokens (``<BoI>``, the image placeholder) get their own trainable embedding rows and output
head rows, so the base LLM can stay frozen (the paper).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from model.config import LanguageConfig
from model.mmfs import MMFS, ImageFeatures

CONTEXT_KWARG = "mmfs_context"


@dataclass
class MMFSContext:
    """What the LLM's MMFS blocks need for one forward call.

    Attributes:
        features: image slots per sequence, values ``(B, K, S, C)`` (the LLM's pyramid levels).
        visible: ``(B, T, K)`` bool, the images each of the T (new) tokens may see.
        relative_position: ``(B, T, K)`` int64, 1 = most recent visible image, 0 = invisible.
        layer_inputs: filled during the forward: decoder-layer index -> its input hidden states (kept until the
            context is dropped: a checkpointed layer's recomputation reads it again).
    """

    features: ImageFeatures
    visible: Tensor
    relative_position: Tensor
    layer_inputs: dict[int, Tensor] = field(default_factory=dict)


class GatedMMFS(nn.Module):
    """``tanh(alpha) * MMFS(RMSNorm(hidden))`` with every text token's reference point at (0.5, 0.5)."""

    def __init__(self, config: LanguageConfig, hidden_size: int, feature_dim: int, num_levels: int) -> None:
        super().__init__()
        self.query_norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.feature_norm = nn.RMSNorm(feature_dim, eps=1e-6)
        self.mmfs = MMFS(config.mmfs, hidden_size, feature_dim, hidden_size, num_levels)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden: Tensor, context: MMFSContext) -> Tensor:
        """``hidden: (B, T, D)`` -> ``(B, T, D)``."""
        features = context.features
        normed = ImageFeatures(self.feature_norm(features.values), features.spatial_shapes, features.level_start_index)
        reference = hidden.new_full((hidden.shape[1], 2), 0.5, dtype=torch.float32)
        out = self.mmfs(self.query_norm(hidden), reference, normed, context.visible, context.relative_position)
        return torch.tanh(self.gate).to(out.dtype) * out


@dataclass
class LanguageModelOutput:
    """Attributes:
    logits: ``(B, T, V)`` over the tokenizer's vocabulary (new tokens included).
    hidden_states: ``(B, T, D)`` final (normalised) hidden states.
    past_key_values: the LLM's cache when ``use_cache``.
    layer_states: ``(B, T, L + 1, D)``, the input embeddings and every layer's output (the last one
        normalised), when ``output_layer_states``.
    """

    logits: Tensor
    hidden_states: Tensor
    past_key_values: object | None = None
    layer_states: Tensor | None = None


def decoder_layers(llm: PreTrainedModel) -> nn.ModuleList:
    layers = getattr(llm.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(llm).__name__}'s decoder has no `layers` ModuleList to insert MMFS into")
    return layers


class MMFSLanguageModel(nn.Module):
    """A causal LM with gated MMFS blocks and trainable rows for new tokens.

    Args:
        config: where MMFS goes and its hyper-parameters.
        llm: any ``AutoModelForCausalLM`` whose decoder has ``layers[i].<attention_module>``.
        feature_dim: channels of the image feature maps.
        num_levels: feature levels the MMFS blocks sample.
        new_token_ids: tokenizer ids of the added tokens (``<BoI>``, placeholder).
        vocab_size: size of the tokenizer's vocabulary (logits width).
    """

    def __init__(
        self,
        config: LanguageConfig,
        llm: PreTrainedModel,
        feature_dim: int,
        num_levels: int,
        new_token_ids: Sequence[int],
        vocab_size: int,
    ) -> None:
        super().__init__()
        self.config = config
        self.llm = llm
        if config.freeze_llm:
            self.llm.requires_grad_(False)
        hidden_size = llm.get_input_embeddings().embedding_dim
        base_vocab = llm.get_input_embeddings().num_embeddings
        self.hidden_size = hidden_size
        self.vocab_size = max(vocab_size, base_vocab)
        stray = set(range(base_vocab, vocab_size)) - set(new_token_ids)
        if stray:
            raise ValueError(f"tokenizer ids {sorted(stray)[:5]}... are beyond the LLM's {base_vocab} embeddings")

        # new tokens: own embedding and head rows
        token_to_new = torch.full((self.vocab_size,), -1, dtype=torch.long)
        token_to_new[torch.tensor(list(new_token_ids), dtype=torch.long)] = torch.arange(len(new_token_ids))
        self.register_buffer("token_to_new", token_to_new, persistent=False)
        self.register_buffer("new_token_ids", torch.tensor(list(new_token_ids), dtype=torch.long), persistent=False)
        std = getattr(llm.config, "initializer_range", 0.02)
        self.new_token_embeddings = nn.Embedding(len(new_token_ids), hidden_size)
        nn.init.normal_(self.new_token_embeddings.weight, std=std)
        self.new_token_head = nn.Linear(hidden_size, len(new_token_ids), bias=False)
        nn.init.normal_(self.new_token_head.weight, std=std)

        # MMFS blocks and the hooks that run them
        layers = decoder_layers(llm)
        frequency = config.cross_attention_frequency
        self.mmfs_layers = [i for i in range(len(layers)) if frequency and i % frequency == 0]
        self.mmfs_blocks = nn.ModuleDict(
            {str(i): GatedMMFS(config, hidden_size, feature_dim, num_levels) for i in self.mmfs_layers}
        )
        for i in self.mmfs_layers:
            attention = getattr(layers[i], config.attention_module, None)
            if attention is None:
                raise ValueError(f"decoder layer {i} has no {config.attention_module!r} submodule")
            layers[i].register_forward_pre_hook(self._record_layer_input(i), with_kwargs=True)
            attention.register_forward_hook(self._add_mmfs(i), with_kwargs=True)

    # hooks ----------------------------------------------------------------------------------
    @staticmethod
    def _record_layer_input(index: int):
        def hook(module, args, kwargs):
            context = kwargs.get(CONTEXT_KWARG)
            if context is not None:
                context.layer_inputs[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _add_mmfs(self, index: int):
        def hook(module, args, kwargs, output):
            context = kwargs.get(CONTEXT_KWARG)
            if context is None:
                return output
            attention_out = output[0] if isinstance(output, tuple) else output
            residual = context.layer_inputs[index]
            mixed = attention_out + self.mmfs_blocks[str(index)](residual + attention_out, context)
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        return hook

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each decoder layer (its MMFS block included) in the backward (non-reentrant checkpoints)."""
        self.llm.activation_checkpointing_enable({"use_reentrant": False})

    # embeddings and logits ------------------------------------------------------------------
    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """``input_ids: (B, T)`` -> ``(B, T, D)``; new tokens use their own trainable rows."""
        embeddings = self.llm.get_input_embeddings()
        new_index = self.token_to_new[input_ids]
        is_new = new_index >= 0
        base = embeddings(torch.where(is_new, torch.zeros_like(input_ids), input_ids))
        new = self.new_token_embeddings(new_index.clamp(min=0)).to(base.dtype)
        return torch.where(is_new[..., None], new, base)

    def logits(self, hidden: Tensor) -> Tensor:
        """``hidden: (B, T, D)`` -> ``(B, T, V)``; new tokens' logits come from their own head rows."""
        base = self.llm.get_output_embeddings()(hidden)
        if base.shape[-1] < self.vocab_size:
            base = nn.functional.pad(base, (0, self.vocab_size - base.shape[-1]))
        new = self.new_token_head(hidden).to(base.dtype)
        return base.index_copy(-1, self.new_token_ids, new)

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        context: MMFSContext | None = None,
        past_key_values: object | None = None,
        use_cache: bool = False,
        output_layer_states: bool = False,
    ) -> LanguageModelOutput:
        """
        Args:
            inputs_embeds: ``(B, T, D)``.
            attention_mask: ``(B, 1, T, T_past + T)`` additive float mask (0 = attend).
            position_ids: ``(B, T)``.
            context: MMFS inputs; ``None`` runs the plain LLM (no MMFS at all).
            past_key_values / use_cache: the LLM's KV cache.
        """
        kwargs = {} if context is None else {CONTEXT_KWARG: context}
        out = self.llm.get_decoder()(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=output_layer_states,
            **kwargs,
        )
        hidden = out.last_hidden_state
        layers = torch.stack(out.hidden_states, dim=2) if output_layer_states else None
        return LanguageModelOutput(logits=self.logits(hidden), hidden_states=hidden, past_key_values=out.past_key_values,
                                   layer_states=layers)


def document_causal_mask(
    query_document: Tensor, query_position: Tensor, key_document: Tensor, key_position: Tensor, dtype: torch.dtype
) -> Tensor:
    """Additive ``(B, 1, Tq, Tk)`` mask: attend to earlier-or-same positions of the same document.

    Padding (document < 0) attends only to itself, so no row is empty.
    """
    same_doc = (query_document[:, :, None] == key_document[:, None, :]) & (query_document[:, :, None] >= 0)
    causal = key_position[:, None, :] <= query_position[:, :, None]
    itself = key_position[:, None, :] == query_position[:, :, None]
    allowed = (same_doc & causal) | itself
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def positions_in_document(document_ids: Tensor) -> Tensor:
    """``(B, T)`` -> position of each token within its document (documents are contiguous runs)."""
    b, t = document_ids.shape
    index = torch.arange(t, device=document_ids.device).expand(b, t)
    is_start = torch.ones_like(document_ids, dtype=torch.bool)
    is_start[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start = torch.where(is_start, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start
