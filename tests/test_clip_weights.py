"""CLIP vision weights: Hugging Face folders and open_clip files load into the same tower, which computes what the
Hugging Face model computes; every mismatch (path, keys, shapes, activation, heads) is refused with its name."""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from model.clip_weights import CheckpointConfigError, CheckpointKeysError, CheckpointShapeError
from model.config import MMInterleavedConfig
from model.mm_interleaved import MMInterleaved
from model.vision import build_clip_vision_tower
from tests.tiny_inputs import tiny_tokenizer

WIDTH, PROJECTION = 32, 16
OPEN_CLIP = {
    "embed_dim": PROJECTION,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": WIDTH, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 16, "width": 16, "heads": 2, "layers": 1},
}
"""The tiny tower as an open_clip config: 2 heads of 16, MLP 4 x 32, 4 x 4 patches + class token."""


def hf_vision_config(hidden_act="quick_gelu", num_attention_heads=2):
    """The same tower as a Hugging Face config."""
    return CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=2,
                            num_attention_heads=num_attention_heads, image_size=32, patch_size=8,
                            projection_dim=PROJECTION, hidden_act=hidden_act)


def hf_model(cls, vision):
    """A seeded ``cls`` whose every parameter (LayerNorms too) is perturbed, so any mixed-up name changes the output."""
    torch.manual_seed(0)
    if cls is CLIPModel:
        text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                "vocab_size": 64, "max_position_embeddings": 8, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=PROJECTION))
    else:
        model = cls(vision)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def hf_features(model, image):
    """``(tokens (B, T, D) before the final LayerNorm, pooled (B, E or D))`` as the Hugging Face model computes them."""
    with torch.no_grad():
        if isinstance(model, CLIPModel):
            out = model.vision_model(pixel_values=image)
            return out.last_hidden_state, model.visual_projection(out.pooler_output)
        out = model(pixel_values=image)
        pooled = out.image_embeds if isinstance(model, CLIPVisionModelWithProjection) else out.pooler_output
        return out.last_hidden_state, pooled


def tower_features(tower, image):
    """The same two from an open_clip tower: the transformer's output (via a hook) and ``forward``."""
    seen = []
    handle = tower.transformer.register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        pooled = tower(image)
    handle.remove()
    return seen[0], pooled


@pytest.fixture
def image():
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def hf_folder(tmp_path):
    """A ``CLIPVisionModelWithProjection`` folder (config.json + model.safetensors) and the model."""
    model = hf_model(CLIPVisionModelWithProjection, hf_vision_config())
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


@pytest.mark.parametrize("cls", [CLIPModel, CLIPVisionModelWithProjection, CLIPVisionModel])
def test_a_hugging_face_folder_computes_what_the_hugging_face_model_computes(tmp_path, image, cls):
    model = hf_model(cls, hf_vision_config())
    model.save_pretrained(tmp_path)
    tower = build_clip_vision_tower(OPEN_CLIP, tmp_path)
    tokens, pooled = tower_features(tower, image)
    hf_tokens, hf_pooled = hf_features(model, image)
    torch.testing.assert_close(tokens, hf_tokens, rtol=1e-4, atol=1e-5)  # QuickGELU, q/k/v order, LayerNorms
    torch.testing.assert_close(pooled, hf_pooled, rtol=1e-4, atol=1e-5)  # ln_post and the projection
    assert (tower.proj is None) == (cls is CLIPVisionModel)  # a CLIPVisionModel has no projection to load


def test_an_open_clip_file_of_the_same_weights_gives_the_same_features(tmp_path, image, hf_folder):
    folder, _ = hf_folder
    tower = build_clip_vision_tower(OPEN_CLIP, folder)
    expected = tower_features(tower, image)
    state = {f"visual.{name}": tensor.contiguous() for name, tensor in tower.state_dict().items()}
    # open_clip's formats: safetensors, a DDP-prefixed pickle in a wrapper, the hub folder with its config
    save_file(state, str(tmp_path / "clip.safetensors"))
    torch.save({"state_dict": {f"module.{name}": tensor for name, tensor in state.items()}}, tmp_path / "clip.pt")
    (tmp_path / "hub").mkdir()
    save_file(state, str(tmp_path / "hub" / "open_clip_model.safetensors"))
    (tmp_path / "hub" / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP}))
    # and the Hugging Face folder as a pickle instead of safetensors
    (tmp_path / "hf_bin").mkdir()
    (tmp_path / "hf_bin" / "config.json").write_text((folder / "config.json").read_text())
    torch.save(load_file(str(folder / "model.safetensors")), tmp_path / "hf_bin" / "pytorch_model.bin")
    for bare in ("clip.safetensors", "clip.pt"):
        with pytest.warns(UserWarning, match="does not state its activation"):
            got = tower_features(build_clip_vision_tower(OPEN_CLIP, tmp_path / bare), image)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for stated in ("hub", "hf_bin"):
        got = tower_features(build_clip_vision_tower(OPEN_CLIP, tmp_path / stated), image)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_quick_gelu_is_read_from_the_hugging_face_config_and_a_disagreeing_config_is_refused(tmp_path):
    gelu = {**OPEN_CLIP, "quick_gelu": False}
    hf_model(CLIPVisionModel, hf_vision_config(hidden_act="quick_gelu")).save_pretrained(tmp_path / "quick")
    with pytest.raises(CheckpointConfigError,
                       match=r"config\.json .*quick_gelu: checkpoint True, tower False.*ViT-L-14-quickgelu"):
        build_clip_vision_tower(gelu, tmp_path / "quick")
    hf_model(CLIPVisionModel, hf_vision_config(hidden_act="gelu")).save_pretrained(tmp_path / "gelu")
    with pytest.raises(CheckpointConfigError, match="quick_gelu: checkpoint False, tower True"):
        build_clip_vision_tower(OPEN_CLIP, tmp_path / "gelu")
    tower = build_clip_vision_tower(gelu, tmp_path / "gelu")
    assert not any(type(m).__name__ == "QuickGELU" for m in tower.modules())


def test_an_open_clip_config_beside_the_file_states_its_activation(tmp_path, hf_folder):
    tower = build_clip_vision_tower(OPEN_CLIP, hf_folder[0])
    state = {f"visual.{k}": v.contiguous() for k, v in tower.state_dict().items()}
    save_file(state, str(tmp_path / "clip.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP}))
    with pytest.raises(CheckpointConfigError,
                       match=r"open_clip_config\.json .*quick_gelu: checkpoint True, tower False"):
        build_clip_vision_tower({**OPEN_CLIP, "quick_gelu": False}, tmp_path / "clip.safetensors")


def test_heads_that_shapes_cannot_show_are_checked(hf_folder):
    four_heads = copy.deepcopy(OPEN_CLIP)
    four_heads["vision_cfg"]["head_width"] = 8
    with pytest.raises(CheckpointConfigError, match="heads: checkpoint 2, tower 4"):
        build_clip_vision_tower(four_heads, hf_folder[0])


def test_a_path_that_does_not_exist_is_named(tmp_path, hf_folder):
    missing = tmp_path / "no" / "clip.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_clip_vision_tower(OPEN_CLIP, missing)
    (hf_folder[0] / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*pytorch_model\.bin.*" + str(hf_folder[0])):
        build_clip_vision_tower(OPEN_CLIP, hf_folder[0])


def test_missing_and_unexpected_keys_are_named_with_the_file(tmp_path, hf_folder):
    tower = build_clip_vision_tower(OPEN_CLIP, hf_folder[0])
    state = {f"visual.{k}": v.contiguous() for k, v in tower.state_dict().items() if k != "ln_post.bias"}
    state["visual.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "clip.safetensors"))
    with pytest.warns(UserWarning), pytest.raises(CheckpointKeysError) as error:
        build_clip_vision_tower(OPEN_CLIP, tmp_path / "clip.safetensors")
    assert str(tmp_path / "clip.safetensors") in str(error.value)
    assert "1 missing [ln_post.bias]" in str(error.value) and "1 unexpected [extra.weight]" in str(error.value)
    # a Hugging Face layer without k_proj: its q/v stay under their own names and in_proj is missing
    hf_state = load_file(str(hf_folder[0] / "model.safetensors"))
    del hf_state["vision_model.encoder.layers.1.self_attn.k_proj.weight"]
    save_file(hf_state, str(hf_folder[0] / "model.safetensors"))
    with pytest.raises(CheckpointKeysError, match=r"1 missing \[transformer\.resblocks\.1\.attn\.in_proj_weight\], "
                                                  r"2 unexpected \[.*layers\.1\.self_attn\.q_proj\.weight"):
        build_clip_vision_tower(OPEN_CLIP, hf_folder[0])


def test_a_shape_mismatch_names_the_key_and_both_shapes(hf_folder):
    larger = copy.deepcopy(OPEN_CLIP)
    larger["vision_cfg"]["image_size"] = 48
    with pytest.raises(CheckpointShapeError, match=r"model\.safetensors: 1 tensors .*positional_embedding: checkpoint "
                                                   r"\(17, 32\), tower \(37, 32\)"):
        build_clip_vision_tower(larger, hf_folder[0])


def test_the_paper_preset_refuses_a_random_frozen_vit():
    with pytest.raises(ValueError, match="clip_checkpoint"):
        MMInterleavedConfig.paper(llm_path="llm", diffusion_path="sd", clip_checkpoint=None)


def test_a_trained_vit_is_saved_with_the_model_and_a_frozen_one_is_referenced(tmp_path, hf_folder):
    """A ViT loaded from a local file and then trained (``train_vit``) is copied into the checkpoint: loading it again
    from the file would silently undo its training. A frozen one is referenced by its path, as before."""
    for train_vit in (True, False):
        config = MMInterleavedConfig.tiny()
        config.vision = dataclasses.replace(config.vision, clip_model=OPEN_CLIP, clip_checkpoint=str(hf_folder[0]),
                                            train_vit=train_vit)
        model = MMInterleaved(config, tiny_tokenizer())
        assert all(p.requires_grad == train_vit for p in model.vision.vit.parameters())
        with torch.no_grad():
            model.vision.vit.conv1.weight.add_(1.0)  # as training (or a stray write to a frozen tower) would
        model.save_pretrained(tmp_path / str(train_vit))
        saved = load_file(tmp_path / str(train_vit) / "model.safetensors")
        assert ("vision.vit.conv1.weight" in saved) == train_vit
        loaded = MMInterleaved.from_pretrained(tmp_path / str(train_vit)).vision.vit.conv1.weight
        torch.testing.assert_close(loaded, model.vision.vit.conv1.weight if train_vit
                                   else build_clip_vision_tower(OPEN_CLIP, str(hf_folder[0])).conv1.weight)
