"""The whole model: losses and gradients, overfitting, generation, checkpoints, the paper preset's loading path."""

import dataclasses
import json

import open_clip
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from model.batch import InterleavedBatch, document_ids_from_cu_seqlens, encode_document
from model.config import MMInterleavedConfig, OptimizerGroups, ResamplerConfig
from model.language import document_causal_mask
from model.mm_interleaved import MMInterleaved
from model.saved_format import FORMAT_1_OPTIONS, SAVED_FORMAT
from tiny_inputs import tiny_batch, tiny_tokenizer


def build(seed=0, **tiny):
    torch.manual_seed(seed)
    return MMInterleaved.from_config(MMInterleavedConfig.tiny(**tiny), tiny_tokenizer())


@pytest.fixture(scope="module")
def model():
    return build()


def test_forward_backward_reaches_mmfs_resampler_and_unet(model):
    model.train()
    with torch.no_grad():  # open the gates, as after a few steps, so MMFS' inner weights get gradients
        for block in model.language.mmfs_blocks.values():
            block.gate.fill_(0.5)
    try:
        out = model(tiny_batch(model))
        assert torch.isfinite(out.loss) and out.text_loss > 0 and out.image_loss > 0
        model.zero_grad()
        out.loss.backward()
    finally:
        with torch.no_grad():
            for block in model.language.mmfs_blocks.values():
                block.gate.zero_()
    params = dict(model.named_parameters())
    for name in (
        "language.mmfs_blocks.0.gate",
        "language.mmfs_blocks.0.mmfs.value_proj.weight",
        "language.mmfs_blocks.2.mmfs.sampling_offsets.bias",
        "vision.resampler.queries",
        "vision.pyramid.spatial_prior.projections.1.weight",  # level 0 feeds only the (zero-init) UNet MMFS,
        "vision.pyramid.interactions.0.injector.gamma",
        "decoder.condition.project.weight",
        "decoder.layer_mix.logits",
        "decoder.unet.conv_in.weight",
        "decoder.skip_mmfs.0.zero_conv.weight",
        "decoder.mid_mmfs.zero_conv.weight",
        "language.new_token_embeddings.weight",
    ):
        grad = params[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in params.items() if n.startswith(("vision.vit.", "decoder.vae.")))


def test_small_preset_draws_64_px_from_16_px_latents_and_trains_every_new_part():
    """The quality recipe's model: 64-px images in and out (the VAE downsamples 4x to the UNet's 16x16 latents), wider
    than ``tiny`` everywhere, and one step reaches the visual resampler, the LLM, the condition and the UNet."""
    torch.manual_seed(0)
    small = MMInterleaved.from_config(MMInterleavedConfig.small(), tiny_tokenizer())
    tiny = MMInterleaved.from_config(MMInterleavedConfig.tiny(), tiny_tokenizer())
    assert small.image_size == (64, 64) and small.vision.image_size == (64, 64)
    assert small.decoder.unet.config.sample_size == 16 and small.num_visual_tokens == 16
    assert sum(p.numel() for p in small.parameters()) > 3 * sum(p.numel() for p in tiny.parameters())
    batch = tiny_batch(small, rows=1)
    assert batch.images.shape[-2:] == (64, 64)
    out = small(batch)
    out.loss.backward()
    params = dict(small.named_parameters())
    for name in ("vision.resampler.queries", "language.new_token_embeddings.weight",
                 "decoder.condition.project.weight", "decoder.unet.conv_in.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


def test_image_loss_only_for_images_with_preceding_context(model):
    batch = tiny_batch(model, rows=2)  # per row: a text-first 2-image story, then an image-first caption
    layout = model._layout(batch.input_ids, batch.document_ids)
    assert model._image_has_context(batch, layout).tolist() == [True, True, False, True, True, False]
    batch.image_loss_mask = torch.tensor([True, False, True, True, True, True])
    assert model._image_has_context(batch, layout).tolist() == [True, False, False, True, True, False]
    model.eval()
    with torch.no_grad():
        assert model(batch).num_trained_images == 3


def test_text_targets_ignore_placeholders_padding_and_document_crossings(model):
    batch = tiny_batch(model, rows=2, pad_to=120)
    targets = model._text_targets(batch)
    ids, docs = batch.input_ids, batch.document_ids
    assert not (targets == model.image_token_id).any()
    assert (targets[docs[:, 1:] < 0] == -100).all()
    crossing = (docs[:, 1:] != docs[:, :-1])
    assert (targets[crossing] == -100).all()
    assert (targets == model.boi_token_id).sum() == (ids[:, 1:] == model.boi_token_id).sum()


def test_batch_contract_is_checked(model):
    batch = tiny_batch(model)
    with pytest.raises(ValueError, match="<BoI> tokens but"):
        model(InterleavedBatch(batch.input_ids, batch.document_ids, batch.images[:-1]))
    broken = batch.input_ids.clone()
    broken[0, (broken[0] == model.image_token_id).nonzero()[0]] = model.tokenizer.eos_token_id
    with pytest.raises(ValueError, match="image tokens"):
        model(InterleavedBatch(broken, batch.document_ids, batch.images))
    assert document_ids_from_cu_seqlens(torch.tensor([0, 3, 5]), 7).tolist() == [0, 0, 0, 1, 1, -1, -1]


def test_overfit_one_batch_cuts_text_and_image_loss():
    """20 steps on one row halve its text loss and cut its diffusion loss by 30% (measured 0.42 and 0.64). Not by half,
    as with epsilon-prediction: the v target at low noise is nearly the noise itself, which no fit of one image
    predicts (0.51 after 60 steps)."""
    model = build(seed=0)
    batch = tiny_batch(model, rows=1)

    def evaluate():
        model.eval()
        text, image = 0.0, 0.0
        with torch.no_grad():
            for seed in range(3):  # same noise and timesteps before and after training
                torch.manual_seed(100 + seed)
                out = model(batch)
                text, image = text + out.text_loss.item() / 3, image + out.image_loss.item() / 3
        model.train()
        return text, image

    text0, image0 = evaluate()
    optimizer = torch.optim.AdamW(model.parameter_groups(OptimizerGroups(lr=3e-3, decoder_lr=3e-3, offsets_lr=None, weight_decay=0.0)))
    for step in range(20):
        torch.manual_seed(step)
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    text1, image1 = evaluate()
    assert text1 <= 0.5 * text0, (text0, text1)
    assert image1 <= 0.7 * image0, (image0, image1)


def test_generate_with_forced_boi_returns_text_and_an_image(model):
    model.eval()
    out = model.generate(["a red square <BoI>"], max_new_tokens=4, num_inference_steps=2, guidance_scale=3.0)
    assert isinstance(out.text, str)
    assert len(out.images) == 1 and isinstance(out.images[0], Image.Image)
    assert out.images[0].size == (32, 32)
    assert out.elements[0] is out.images[0]
    n = model.num_visual_tokens
    boi = out.token_ids.index(model.boi_token_id)
    assert out.token_ids[boi + 1 : boi + 1 + n] == [model.image_token_id] * n


def test_text_nats_is_the_training_text_loss_of_one_document(model):
    model.eval()
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    document = [image, "a large red square in the center."]
    ids, images = encode_document(model.tokenizer, document, model.boi_token_id, model.image_token_id,
                                  model.num_visual_tokens, model.image_size)
    batch = InterleavedBatch(torch.tensor([ids]), torch.zeros(1, len(ids), dtype=torch.long), torch.stack(images))
    with torch.no_grad():
        expected = float(model(batch).text_loss)
    assert model.text_nats(document) == pytest.approx(expected) and expected > 0
    assert model.text_nats(["no image here."]) > 0


def test_image_loss_averages_over_all_images_as_the_release(model):
    """The release divides the trained images' summed loss by every image of the batch (zeros for the untrained);
    ``trained_images`` by the trained ones only."""
    assert MMInterleavedConfig.tiny().image_loss_average == "trained_images"  # the demo's recipe, kept
    batch = tiny_batch(model)
    model.eval()
    losses = {}
    try:
        for average in ("all_images", "trained_images"):
            model.config.image_loss_average = average
            torch.manual_seed(3)
            with torch.no_grad():
                out = model(batch)
            losses[average] = out.image_loss
    finally:
        model.config.image_loss_average = "trained_images"
    assert 0 < out.num_trained_images < len(batch.images)
    torch.testing.assert_close(losses["all_images"], losses["trained_images"] * out.num_trained_images / len(batch.images))
    with pytest.raises(ValueError, match="image_loss_average"):
        dataclasses.replace(MMInterleavedConfig.tiny(), image_loss_average="images")


def test_cfg_negative_starts_as_the_empty_prompts_condition():
    """The release starts its negative condition from Stable Diffusion's empty-prompt embedding; weft's is the condition
    its own path gives an image with an empty prompt (<s> <BoI>): the same as the condition a training batch computes
    for such an image."""
    config = MMInterleavedConfig.tiny()
    config.decoder = dataclasses.replace(config.decoder, negative_init="empty_prompt",
                                         condition=ResamplerConfig(num_queries=5, hidden_size=32, num_layers=1, num_heads=2))
    torch.manual_seed(0)
    model = MMInterleaved.from_config(config, tiny_tokenizer()).eval()
    negative = model.decoder.negative_condition.detach()
    torch.testing.assert_close(negative, model.empty_prompt_condition())
    # the condition a training batch's path (its layout, cut at <BoI>) gives the image of "<s> <BoI> <image>..."
    ids = torch.tensor([[model.tokenizer.bos_token_id, model.boi_token_id] + [model.image_token_id] * model.num_visual_tokens])
    docs, positions = torch.zeros_like(ids), torch.arange(ids.shape[1])[None]
    mask = document_causal_mask(docs, positions, docs, positions, torch.float32)
    with torch.no_grad():
        lm = model.language(model.language.embed_tokens(ids), mask, positions, model._llm_context(docs, positions, None, None),
                            output_layer_states=True)
        states, valid = model._condition_inputs(model._condition_states(lm), docs, model._layout(ids, docs), torch.tensor([0]))
        torch.testing.assert_close(model.decoder.encode_condition(states, valid).tokens[0], negative)
    assert negative.std() > 0.1  # not the random init's 0.02
    with pytest.raises(ValueError, match="decoder.negative_init"):
        dataclasses.replace(config.decoder, condition=None)


def test_parameter_groups_follow_the_release(model):
    """New decoder modules at the main rate, the UNet at the decoder's, every sampling offset at its own without
    weight decay (the release's 1e-4 / 1e-5 / 1e-5)."""
    groups = {g["name"]: g for g in model.parameter_groups()}
    names = {name: g for g in groups.values() for name in g["param_names"]}
    assert names["decoder.unet.conv_in.weight"]["lr"] == 1e-5
    for new in ("decoder.condition.project.weight", "decoder.skip_mmfs.0.mmfs.value_proj.weight",
                "decoder.mid_mmfs.zero_conv.weight", "decoder.negative_condition",
                "language.mmfs_blocks.0.mmfs.value_proj.weight"):
        assert names[new]["lr"] == 1e-4, new
    for offsets in ("language.mmfs_blocks.0.mmfs.sampling_offsets.weight", "decoder.skip_mmfs.0.mmfs.sampling_offsets.bias"):
        assert names[offsets] is groups["offsets"], offsets
    assert groups["offsets"]["lr"] == 1e-5 and groups["offsets"]["weight_decay"] == 0.0
    assert names["language.mmfs_blocks.0.gate"]["weight_decay"] == 0.0
    assert names["language.mmfs_blocks.0.mmfs.value_proj.weight"]["weight_decay"] == 0.05
    assert len(names) == sum(1 for p in model.parameters() if p.requires_grad)


def test_parameter_groups_can_keep_offsets_and_new_modules_with_their_module(model):
    rates = OptimizerGroups(lr=1e-3, decoder_lr=2e-3, new_decoder_lr=2e-3, offsets_lr=None)
    groups = model.parameter_groups(rates)
    names = {name: g for g in groups for name in g["param_names"]}
    assert "offsets" not in {g["name"] for g in groups}
    assert names["decoder.skip_mmfs.0.mmfs.sampling_offsets.bias"]["lr"] == 2e-3
    assert names["decoder.condition.project.weight"]["lr"] == 2e-3
    assert names["language.mmfs_blocks.0.mmfs.sampling_offsets.weight"]["lr"] == 1e-3
    assert names["language.mmfs_blocks.0.mmfs.sampling_offsets.weight"]["weight_decay"] == 0.0


def outputs(model, batch):
    model.eval()
    torch.manual_seed(7)
    with torch.no_grad():
        out = model(batch)
    return out.logits, out.image_loss


def test_save_load_round_trip(model, tmp_path):
    batch = tiny_batch(model)
    with torch.no_grad():
        for block in model.language.mmfs_blocks.values():
            block.gate.fill_(0.3)  # weights that differ from a fresh init
    try:
        expected = outputs(model, batch)
        model.save_pretrained(tmp_path)
    finally:
        with torch.no_grad():
            for block in model.language.mmfs_blocks.values():
                block.gate.zero_()
    assert json.loads((tmp_path / "config.json").read_text())["language"]["cross_attention_frequency"] == 2
    loaded = MMInterleaved.from_pretrained(tmp_path)
    assert loaded.boi_token_id == model.boi_token_id and loaded.image_token_id == model.image_token_id
    got = outputs(loaded, batch)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)


def test_a_folder_saved_before_format_2_loads_as_the_model_it_was(tmp_path):
    """A checkpoint written before the ViT-Adapter and the release's decoder options: no "format", none of those options
    in its config, the simple pyramid's weights under their old names."""
    torch.manual_seed(0)
    config = MMInterleavedConfig.tiny()
    config.vision.pyramid = "simple"
    old = MMInterleaved.from_config(config, tiny_tokenizer())
    batch = tiny_batch(old)
    expected = outputs(old, batch)
    old.save_pretrained(tmp_path)
    assert MMInterleavedConfig.load(tmp_path / "config.json") == config  # a saved config builds a model too
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved.pop("format") == SAVED_FORMAT
    for path in FORMAT_1_OPTIONS:
        section = saved
        for key in path[:-1]:
            section = section[key]
        del section[path[-1]]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    state = load_file(str(tmp_path / "model.safetensors"))
    renamed = {k.replace("vision.pyramid.levels.", "vision.pyramid."): v for k, v in state.items()}
    assert renamed.keys() != state.keys()
    save_file(renamed, str(tmp_path / "model.safetensors"))

    loaded = MMInterleaved.from_pretrained(tmp_path)
    assert loaded.config.vision.pyramid == "simple" and loaded.config.decoder.context_positions == "from_start"
    got = outputs(loaded, batch)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    (tmp_path / "config.json").write_text(json.dumps({**saved, "format": SAVED_FORMAT + 1}))
    with pytest.raises(ValueError, match="format 3.*upgrade weft"):
        MMInterleaved.from_pretrained(tmp_path)


def write_tiny_paper_checkpoints(root, tiny):
    """Tiny checkpoints in the paper preset's formats: HF LLM dir, open_clip state dict, SD dir."""
    clip_dir = root / "clip_configs"
    clip_dir.mkdir()
    (clip_dir / "weft-test-vit.json").write_text(json.dumps(tiny.vision.clip_model))
    open_clip.add_model_config(clip_dir)
    clip = open_clip.create_model("weft-test-vit", pretrained=None)
    save_file(clip.state_dict(), str(root / "clip.safetensors"))
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny.vision.clip_model}))  # as open_clip's hub

    llm_config = dict(tiny.language.llm_config)
    model_type = llm_config.pop("model_type")
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **llm_config))
    llm.save_pretrained(root / "llm")
    tiny_tokenizer().save_pretrained(root / "llm")

    sd = root / "sd"
    UNet2DConditionModel.from_config(tiny.decoder.unet_config).save_pretrained(sd / "unet")
    AutoencoderKL.from_config(tiny.decoder.vae_config).save_pretrained(sd / "vae")
    DDPMScheduler.from_config(tiny.decoder.scheduler_config).save_pretrained(sd / "scheduler")
    return clip, llm


def small_trainable_parts(config):
    """The paper preset with its trainable modules shrunk (the frozen parts still come from the paths)."""
    small = MMInterleavedConfig.tiny()
    config.vision.resampler = dataclasses.replace(small.vision.resampler, num_queries=config.vision.resampler.num_queries)
    config.language.mmfs = dataclasses.replace(config.language.mmfs, hidden_size=64)
    config.decoder.mmfs = dataclasses.replace(config.decoder.mmfs, hidden_size=64)
    config.decoder.condition = dataclasses.replace(config.decoder.condition, hidden_size=32, num_heads=2, mlp_ratio=2.0)
    return config


@pytest.mark.parametrize("sizes", ["small", pytest.param("paper", marks=pytest.mark.slow)])
def test_paper_preset_loads_local_checkpoints(tmp_path, sizes):
    tiny = MMInterleavedConfig.tiny()
    clip, llm = write_tiny_paper_checkpoints(tmp_path, tiny)
    config = MMInterleavedConfig.paper(
        llm_path=str(tmp_path / "llm"),
        diffusion_path=str(tmp_path / "sd"),
        clip_checkpoint=str(tmp_path / "clip.safetensors"),
        clip_model="weft-test-vit",
        num_visual_tokens=4,
    )
    # the ViT-Adapter works at the frozen ViT's width and interacts at its layers: the tiny ViT's
    config.vision = dataclasses.replace(config.vision, pyramid_channels=tiny.vision.pyramid_channels,
                                        adapter=tiny.vision.adapter)
    if sizes == "small":
        config = small_trainable_parts(config)
    torch.manual_seed(0)
    model = MMInterleaved.from_config(config)  # tokenizer from llm_path
    # the paper's layout and sizes around the tiny frozen parts
    assert model.language.mmfs_layers == [0]  # every 4th of 4 layers
    block = model.language.mmfs_blocks["0"].mmfs
    assert (block.config.num_heads, block.config.num_points, block.num_levels) == (16, 8, 3)
    assert model.decoder.mid_mmfs.mmfs.num_levels == 4 and model.decoder.negative_condition.shape[0] == 77
    assert not any(p.requires_grad for p in model.language.llm.parameters())
    # the frozen parts are the checkpoints' weights
    torch.testing.assert_close(model.vision.vit.conv1.weight, clip.visual.conv1.weight)
    torch.testing.assert_close(model.language.llm.get_input_embeddings().weight, llm.get_input_embeddings().weight)
    # it trains on a batch
    batch = tiny_batch(model, rows=1)
    out = model(batch)
    assert torch.isfinite(out.loss) and out.num_trained_images == 2
    out.loss.backward()
    # a checkpoint references the frozen LLM, ViT and VAE by path instead of copying them
    model.save_pretrained(tmp_path / "ckpt")
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert not any(k.startswith(("language.llm.", "vision.vit.", "decoder.vae.")) for k in saved)
    assert any(k.startswith("decoder.unet.") for k in saved)
    loaded = MMInterleaved.from_pretrained(tmp_path / "ckpt")
    expected, got = outputs(model, batch), outputs(loaded, batch)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
