"""The image decoder's condition: LLM hidden states (document start .. ``<BoI>``) -> UNet cross-attention tokens.

Two encoders, chosen by :class:`~model.config.DecoderConfig`:

- :class:`ResampledCondition` (the paper): Linear + 1-D sin-cos positions (counted back from ``<BoI>`` as the
  release, or from the document start: ``DecoderConfig.context_positions``), then a Perceiver/Q-Former
  resampler with a fixed number of queries (77 for Stable Diffusion).
- :class:`TokenCondition`: every context token becomes one condition token (Linear + 1-D sin-cos), as
  Stable Diffusion's UNet reads its text encoder's per-token states; the width varies per image and
  a mask marks the real tokens.

and which LLM states they read (``DecoderConfig.condition_layers``):

- ``"last"`` (the paper): the final, normalised hidden states.
- ``"all"``: :class:`LayerMix`, a learned softmax-weighted mean of the RMS-normalised embeddings and
  every layer's output.

Why the tiny preset uses ``TokenCondition`` over ``"all"`` layers (measured on the sample world,
``/tmp`` experiments recorded in the issue note): a from-scratch LLM trained on next-token prediction
drops the content a caption no longer needs — a linear probe recovers which colours a caption names
from its per-token last-layer states at F1 0.67 after 600 text steps (0.999 at init; 0.96 from the
first layer's output). Over the last layer the decoder never learned to use its condition (image loss
with a shuffled condition minus with the right one: 0.0005 after 4,000 steps); over the layer mix
through the 16-query resampler, 0.001 after 2,000; over the layer mix per token, 0.022 after 1,500
(an oracle condition of one token per object: 0.036).

Why its tokens start at an RMS of 4 (``DecoderConfig.condition_rms``): two prompts that differ in one word give
conditions that differ mostly at that word's token, and a UNet cross-attention with near-uniform attention dilutes it
among the shared tokens. With the decoder alone, two fixed random conditions of 10 tokens that differ in one token
were still drawn as the same picture after 400 steps at RMS 1, and told apart by 300 steps at RMS 3; differing in
all 10, by 200. Through the whole model (two captions differing in their colour word, 300 steps), the projected LLM
states at their native RMS of ~0.5 drew both prompts in one colour up to 450 steps (pixel difference of the two
samples 2.8 / 255); at RMS ~4 the two were drawn in their own colours from 450-600 steps on (31-43 / 255).

Why the tiny UNet keeps diffusers' 8 attention heads (4-8 channels each): drawing a scene needs each place in the
latent to read several words at once (its position words, and the colour, shape and size words bound to them).
After 2,000 steps on 2,000 sample-world pairs (64 held-out prompts, attribute accuracy at guidance 1 / 3), the whole
model drew 0.21 / 0.24 with 8 heads and 0.13 / 0.16 with 2 (loss gap with a swapped condition at t=500: 0.015 vs
0.012); the UNet alone on word embeddings 0.32 / 0.41 vs 0.23 / 0.26. An oracle condition of one token per object,
which needs no binding, reaches 0.71 / 0.81.

Why the decoders built from scratch draw their training timesteps from the noisy end (``DecoderConfig.timestep_bias``
= 1, density rising linearly in t): a scene's layout and colours are decided at high noise, and a uniform draw spends
only a quarter of its steps above t=750 (the biased one 44%), the rest refining latents whose layout is already there.
The UNet alone on word embeddings (2,000 pairs, 200 held-out prompts, run side by side): attribute accuracy at
guidance 1 / 3 after 1,000 steps 0.33 / 0.44 biased vs 0.15 / 0.17 uniform, after 2,000 0.41 / 0.52 vs 0.26 / 0.36
(guidance 3: [0.48, 0.56] vs [0.32, 0.40], 95% bootstrap); the loss gap with a swapped condition at t=500 0.021 vs 0.011.
The whole model (LLM states as the condition, same data): after 1,000 steps 0.19 / 0.27 vs 0.09 / 0.11, after 2,000
0.28 [0.25, 0.32] / 0.35 [0.32, 0.39] vs 0.15 [0.12, 0.17] / 0.19 [0.16, 0.22], gap 0.025 vs 0.012.
A stronger bias (density ∝ t^3; the UNet alone on word embeddings) starts slower and ends higher: 0.26 / 0.34 after
1,000 steps, 0.53 / 0.62 [0.58, 0.65] after 2,000. It is not yet tried through the whole model or at the demo's 500
steps, so the presets keep 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.config import DecoderConfig
from model.mmfs import sincos_1d
from model.resampler import PerceiverResampler


@dataclass
class Condition:
    """UNet cross-attention input.

    Attributes:
        tokens: ``(N, W, C)``.
        mask: ``(N, W)`` bool, True for real tokens (every row has at least one).
    """

    tokens: Tensor
    mask: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, items: slice) -> "Condition":
        """The condition of ``items`` of the N items (views, no copy)."""
        return Condition(self.tokens[items], self.mask[items])

    def detach(self) -> "Condition":
        return Condition(self.tokens.detach(), self.mask)

    def repeat(self, times: int) -> "Condition":
        """The N items ``times`` over, ``(times * N, W, C)``: rows ``k * N .. (k + 1) * N - 1`` are copy ``k``."""
        return Condition(self.tokens.repeat(times, 1, 1), self.mask.repeat(times, 1))

    def roll(self, shifts: int) -> "Condition":
        """Each item gets another item's condition (a prompt swap)."""
        return Condition(self.tokens.roll(shifts, 0), self.mask.roll(shifts, 0))

    def where(self, replace: Tensor, other: "Condition") -> "Condition":
        """Items with ``replace (N,)`` True take ``other``'s tokens (padded or cut to this width)."""
        tokens, mask = _fit(other, self.tokens.shape[1])
        return Condition(torch.where(replace[:, None, None], tokens.to(self.tokens.dtype), self.tokens),
                         torch.where(replace[:, None], mask, self.mask))

    @staticmethod
    def cat(conditions: list["Condition"]) -> "Condition":
        """Concatenate along the batch, padding every width to the widest."""
        width = max(c.tokens.shape[1] for c in conditions)
        parts = [_fit(c, width) for c in conditions]
        return Condition(torch.cat([t for t, _ in parts]), torch.cat([m for _, m in parts]))


def _fit(condition: Condition, width: int) -> tuple[Tensor, Tensor]:
    """``condition``'s tokens and mask padded with masked zeros (or cut) to ``width``."""
    tokens, mask = condition.tokens[:, :width], condition.mask[:, :width]
    pad = width - tokens.shape[1]
    if pad > 0:
        tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], pad, tokens.shape[2])], dim=1)
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], dim=1)
    return tokens, mask


class LayerMix(nn.Module):
    """Softmax-weighted mean of ``S`` RMS-normalised LLM states: ``(N, W, S, D)`` -> ``(N, W, D)``.

    The weights start equal, so every layer, the embeddings included, reaches the decoder from step 0.
    """

    def __init__(self, num_states: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_states))
        self.eps = eps

    def forward(self, states: Tensor) -> Tensor:
        if states.shape[-2] != self.logits.numel():
            raise ValueError(f"LayerMix expects {self.logits.numel()} states per token, got {states.shape[-2]}")
        normed = states * torch.rsqrt(states.float().pow(2).mean(-1, keepdim=True) + self.eps).to(states.dtype)
        return torch.einsum("nwsd,s->nwd", normed, self.logits.softmax(0).to(states.dtype))


class ResampledCondition(nn.Module):
    """The paper's condition: ``num_queries`` tokens resampled from the context states."""

    def __init__(self, config: DecoderConfig, llm_hidden_size: int, cross_dim: int) -> None:
        super().__init__()
        self.positions_dim = config.condition.hidden_size
        self.from_boi = config.context_positions == "from_boi"
        self.resampler = PerceiverResampler(config.condition, llm_hidden_size, cross_dim)
        self.num_negative_tokens = config.condition.num_queries

    def forward(self, hidden: Tensor, mask: Tensor) -> Condition:
        """``hidden (N, W, D)``, ``mask (N, W)`` (real tokens first, the last real one ``<BoI>``) -> ``num_queries``
        tokens per item."""
        index = torch.arange(hidden.shape[1], device=hidden.device)[None]
        positions = (mask.sum(1, keepdim=True) - 1 - index).clamp(min=0) if self.from_boi else index
        tokens = self.resampler(hidden, mask, sincos_1d(positions, self.positions_dim))
        return Condition(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))


class TokenCondition(nn.Module):
    """One condition token per context token, ``RMSNorm(Linear(hidden))`` with its gain starting at
    ``config.condition_rms``: the LLM's causal attention has already placed each token in its context, as a
    text encoder's per-token states are for Stable Diffusion."""

    num_negative_tokens = 1

    def __init__(self, config: DecoderConfig, llm_hidden_size: int, cross_dim: int) -> None:
        super().__init__()
        self.project = nn.Linear(llm_hidden_size, cross_dim)
        self.norm = nn.RMSNorm(cross_dim, eps=1e-6)
        nn.init.constant_(self.norm.weight, config.condition_rms)

    def forward(self, hidden: Tensor, mask: Tensor) -> Condition:
        """``hidden (N, W, D)``, ``mask (N, W)`` -> ``(N, W, cross_dim)`` tokens under the same mask."""
        return Condition(self.norm(self.project(hidden)) * mask[..., None].to(hidden.dtype), mask)


def build_condition_encoder(config: DecoderConfig, llm_hidden_size: int, cross_dim: int) -> nn.Module:
    """:class:`ResampledCondition` when ``config.condition`` is a resampler config, else :class:`TokenCondition`."""
    if config.condition is None:
        return TokenCondition(config, llm_hidden_size, cross_dim)
    return ResampledCondition(config, llm_hidden_size, cross_dim)
