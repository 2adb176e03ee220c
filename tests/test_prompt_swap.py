"""The image decoder draws what it is asked for: after a short fit on two captioned images, swapping the prompts
swaps the pictures (same seed, same noise). The issue this guards against: a decoder whose condition came from
the LLM's last layer through a resampler learned to draw one average picture for every prompt (two opposite
prompts: mean pixel difference 3.3 of 255)."""

import numpy as np
import torch

from model.batch import InterleavedBatch, encode_document
from model.config import MMInterleavedConfig, OptimizerGroups
from model.image_decoder import fit_vae
from model.mm_interleaved import MMInterleaved
from tests.tiny_inputs import square_image, tiny_tokenizer

STEPS = 450
PROMPTS = {"red": "a red square on a white background.", "blue": "then a blue square moves left."}


def _batch(model: MMInterleaved, images: dict[str, torch.Tensor], repeat: int) -> InterleavedBatch:
    """One document ``caption <BoI> [image]`` per row, every prompt ``repeat`` times (more noise draws a step)."""
    rows = [encode_document(model.tokenizer, [PROMPTS[c], images[c]], model.boi_token_id, model.image_token_id,
                            model.num_visual_tokens, model.image_size) for c in PROMPTS for _ in range(repeat)]
    width = max(len(ids) for ids, _ in rows)
    pad = model.tokenizer.pad_token_id
    return InterleavedBatch(input_ids=torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
                            document_ids=torch.tensor([[0] * len(ids) + [-1] * (width - len(ids)) for ids, _ in rows]),
                            images=torch.cat([torch.stack(imgs) for _, imgs in rows]))


def _draw(model: MMInterleaved, colour: str) -> torch.Tensor:
    boi = model.tokenizer.convert_ids_to_tokens(model.boi_token_id)
    out = model.generate([PROMPTS[colour] + boi], guidance_scale=3.0, num_inference_steps=10,
                         generator=torch.Generator().manual_seed(0))
    (image,) = out.images
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def test_swapping_the_prompt_swaps_the_picture():
    torch.manual_seed(0)
    model = MMInterleaved(MMInterleavedConfig.tiny(), tiny_tokenizer())
    size = model.image_size[0]
    images = {"red": square_image("red", size), "blue": square_image("blue", size, offset=-size // 8)}
    fit_vae(model.decoder.vae, torch.stack(list(images.values())), steps=300, batch_size=2)  # a VAE that tells red from blue
    optimizer = torch.optim.AdamW(model.parameter_groups(OptimizerGroups(lr=1e-3, decoder_lr=2e-3, new_decoder_lr=2e-3, offsets_lr=None)), betas=(0.9, 0.995))
    batch = _batch(model, images, repeat=4)
    model.train()
    for _ in range(STEPS):
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    drawn = {c: _draw(model, c) for c in PROMPTS}
    distance = {(c, d): float((drawn[c] - images[d]).abs().mean()) for c in PROMPTS for d in PROMPTS}
    assert distance["red", "red"] < distance["red", "blue"] and distance["blue", "blue"] < distance["blue", "red"], distance
    assert float((drawn["red"] - drawn["blue"]).abs().mean()) * 255 > 10  # not one average picture
