"""Perceiver Resampler: a fixed number of learned queries summarise a variable-length input.

Used twice: image patch features -> N visual tokens (the image tokenizer), and LLM hidden states
-> the UNet's condition tokens (the image decoder). Each layer lets the queries attend to the
concatenation ``[inputs; queries]`` (Flamingo's resampler), then applies an MLP.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.config import ResamplerConfig
from model.recompute import maybe_checkpoint


class ResamplerLayer(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_inputs = nn.LayerNorm(hidden_size)
        self.norm_queries = nn.LayerNorm(hidden_size)
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(hidden_size)
        inner = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, inner), nn.GELU(), nn.Linear(inner, hidden_size))

    def forward(self, queries: Tensor, inputs: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        q = self.norm_queries(queries)
        kv = torch.cat([self.norm_inputs(inputs), q], dim=1)
        if key_padding_mask is not None:
            key_padding_mask = torch.cat([key_padding_mask, key_padding_mask.new_zeros(q.shape[:2])], dim=1)
        attended, _ = self.attention(q, kv, kv, key_padding_mask=key_padding_mask, need_weights=False)
        queries = queries + attended
        return queries + self.mlp(self.norm_mlp(queries))


class PerceiverResampler(nn.Module):
    """``inputs: (N, S, input_dim)`` -> ``(N, num_queries, output_dim)``.

    With ``gradient_checkpointing`` each layer is recomputed in the backward instead of keeping its activations.
    """

    def __init__(self, config: ResamplerConfig, input_dim: int, output_dim: int) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.input_proj = nn.Linear(input_dim, config.hidden_size)
        self.queries = nn.Parameter(torch.randn(config.num_queries, config.hidden_size) * 0.02)
        self.layers = nn.ModuleList(
            ResamplerLayer(config.hidden_size, config.num_heads, config.mlp_ratio) for _ in range(config.num_layers)
        )
        self.norm_out = nn.LayerNorm(config.hidden_size)
        self.output_proj = nn.Linear(config.hidden_size, output_dim)
        if config.output_init_std is not None:
            nn.init.normal_(self.output_proj.weight, std=config.output_init_std)
            nn.init.zeros_(self.output_proj.bias)

    def forward(self, inputs: Tensor, input_mask: Tensor | None = None, input_embedding: Tensor | None = None) -> Tensor:
        """
        Args:
            inputs: ``(N, S, input_dim)``.
            input_mask: ``(N, S)`` bool, True for real inputs (``None``: all real). Every row needs
                at least one real input or the queries still attend to themselves only.
            input_embedding: optional ``(N or 1, S, hidden_size)`` added after the input projection
                (e.g. positions).
        """
        x = self.input_proj(inputs)
        if input_embedding is not None:
            x = x + input_embedding.to(x.dtype)
        queries = self.queries.to(x.dtype).expand(x.shape[0], -1, -1)
        key_padding_mask = None if input_mask is None else ~input_mask
        for layer in self.layers:
            queries = maybe_checkpoint(self.gradient_checkpointing, layer, queries, x, key_padding_mask)
        return self.output_proj(self.norm_out(queries))
