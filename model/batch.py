"""The batch contract between the data stages and the model, and the image layout derived from it.

A packer produces :class:`InterleavedBatch`: token ids, per-token document ids and the decoded
images. Nothing else is needed: the model finds each image's place from its ``<BoI>`` token
(image ``k`` of ``images`` belongs to the ``k``-th ``<BoI>`` in row-major order), and the
document ids give both the attention boundaries and which images a token may see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image
from torch import Tensor


@dataclass
class InterleavedBatch:
    """One training/eval batch of packed interleaved sequences.

    Attributes:
        input_ids: ``(B, T)`` int64. Each document is ``<s> ... </s>``; each image is ``<BoI>``
            followed by exactly N image-placeholder tokens (N = the model's visual tokens).
        document_ids: ``(B, T)`` int64, the document each token belongs to, non-decreasing along
            a row (any ids: only equality between neighbours matters); ``-1`` marks padding.
            From ``cu_seqlens`` use :func:`document_ids_from_cu_seqlens`.
        images: ``(K, 3, H, W)`` float in ``[0, 1]`` at the decoder's resolution, one per
            ``<BoI>`` in row-major order (row 0 left to right, then row 1, ...). ``K`` may be 0.
        labels: optional ``(B, T)`` int64 targets aligned with ``input_ids`` (shifted inside the
            model; ``-100`` = not trained). Default: ``input_ids`` with placeholders, padding and
            cross-document predictions ignored.
        image_loss_mask: optional ``(K,)`` bool, False to skip an image's diffusion loss (e.g.
            pair data where the image comes first). ANDed with the model's own rule (no loss for
            an image with no preceding context in its document).
    """

    input_ids: Tensor
    document_ids: Tensor
    images: Tensor
    labels: Tensor | None = None
    image_loss_mask: Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.document_ids.shape != self.input_ids.shape:
            raise ValueError(f"input_ids {tuple(self.input_ids.shape)} and document_ids {tuple(self.document_ids.shape)} must both be (B, T)")
        if self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be (K, 3, H, W), got {tuple(self.images.shape)}")
        if self.labels is not None and self.labels.shape != self.input_ids.shape:
            raise ValueError("labels must have the shape of input_ids")
        if self.image_loss_mask is not None and self.image_loss_mask.shape != (self.images.shape[0],):
            raise ValueError("image_loss_mask must be (K,)")

    def to(self, device: torch.device | str) -> "InterleavedBatch":
        return InterleavedBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device) for f in fields(self)})


def document_ids_from_cu_seqlens(cu_seqlens: Tensor, length: int) -> Tensor:
    """``cu_seqlens`` ``(D + 1,)`` (0, end_1, ..., end_D) of one row -> ``(length,)`` ids, -1 after the last."""
    ids = torch.full((length,), -1, dtype=torch.long)
    for doc, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        ids[start:end] = doc
    return ids


def image_to_tensor(image: Image.Image, size: tuple[int, int]) -> Tensor:
    """PIL image -> ``(3, H, W)`` float in ``[0, 1]`` resized to ``size`` (H, W)."""
    image = image.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def tensor_to_image(tensor: Tensor) -> Image.Image:
    """``(3, H, W)`` in ``[0, 1]`` -> PIL image."""
    array = (tensor.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def encode_document(
    tokenizer,
    elements: Sequence[str | Image.Image | Tensor],
    boi_token_id: int,
    image_token_id: int,
    num_image_tokens: int,
    image_size: tuple[int, int],
    add_bos: bool = True,
    add_eos: bool = True,
) -> tuple[list[int], list[Tensor]]:
    """Tokenise one interleaved document: ``<s>`` text ``<BoI>`` + N placeholders ... ``</s>``.

    Returns the token ids and the images as ``(3, H, W)`` tensors in ``[0, 1]``.
    """
    ids: list[int] = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    images: list[Tensor] = []
    for element in elements:
        if isinstance(element, str):
            ids.extend(tokenizer(element, add_special_tokens=False)["input_ids"])
        else:
            tensor = image_to_tensor(element, image_size) if isinstance(element, Image.Image) else element
            images.append(tensor)
            ids.extend([boi_token_id] + [image_token_id] * num_image_tokens)
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids, images


@dataclass
class ImageLayout:
    """Where the images of a batch are, derived from ``<BoI>`` tokens and document ids.

    Attributes:
        row, boi_position, document: ``(K,)`` per image (global order).
        slot: ``(K,)`` index of the image among its row's images.
        row_images: ``(B, K_max)`` global image index of each row slot, -1 for empty slots.
        slot_valid: ``(B, K_max)`` bool.
        slot_start: ``(B, K_max)`` position of each slot's first placeholder token.
        slot_document: ``(B, K_max)`` document of each slot.
    """

    row: Tensor
    boi_position: Tensor
    document: Tensor
    slot: Tensor
    row_images: Tensor
    slot_valid: Tensor
    slot_start: Tensor
    slot_document: Tensor

    @property
    def num_images(self) -> int:
        return self.row.shape[0]

    @classmethod
    def from_tokens(cls, input_ids: Tensor, document_ids: Tensor, boi_token_id: int, image_token_id: int, num_image_tokens: int) -> "ImageLayout":
        b, t = input_ids.shape
        row, boi_position = (input_ids == boi_token_id).nonzero(as_tuple=True)
        k = row.shape[0]
        # every <BoI> is followed by exactly N placeholders of the same document
        if k:
            offsets = torch.arange(1, num_image_tokens + 1, device=input_ids.device)
            positions = boi_position[:, None] + offsets
            if (positions >= t).any():
                raise ValueError("an image's placeholder tokens run past the end of the sequence")
            ok = (input_ids[row[:, None], positions] == image_token_id).all() and (
                document_ids[row[:, None], positions] == document_ids[row, boi_position][:, None]
            ).all()
            if not ok:
                raise ValueError(f"every <BoI> must be followed by {num_image_tokens} image tokens of its document")
        if int((input_ids == image_token_id).sum()) != k * num_image_tokens:
            raise ValueError("image placeholder tokens found outside <BoI> + N blocks")
        counts = torch.bincount(row, minlength=b)
        first = torch.cumsum(counts, 0) - counts
        slot = torch.arange(k, device=input_ids.device) - first[row]
        k_max = int(counts.max()) if k else 0
        row_images = torch.full((b, k_max), -1, dtype=torch.long, device=input_ids.device)
        row_images[row, slot] = torch.arange(k, device=input_ids.device)
        slot_valid = row_images >= 0
        slot_start = torch.zeros((b, k_max), dtype=torch.long, device=input_ids.device)
        slot_start[row, slot] = boi_position + 1
        document = document_ids[row, boi_position]
        slot_document = torch.full((b, k_max), -2, dtype=torch.long, device=input_ids.device)
        slot_document[row, slot] = document
        return cls(row, boi_position, document, slot, row_images, slot_valid, slot_start, slot_document)
