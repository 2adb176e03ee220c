"""The memory budget (``python -m pipelines.training.budget``): its fake-tensor trace (:mod:`model.memory_trace`)
against a real step, its ZeRO arithmetic, and the paper architecture it builds."""

import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.profiler import ProfilerActivity, profile

from model.config import MMInterleavedConfig
from model.memory_trace import (
    Scenario,
    build_fake_model,
    gradients_dropped,
    packed_sequence,
    trace_training_step,
    word_level_tokenizer,
)
from model.mm_interleaved import MMInterleaved
from pipelines.training.budget import (
    GIB,
    GLOBAL_BATCH,
    PAPER_SCENARIOS,
    SEQUENCE_TOKENS,
    ParameterCount,
    plan,
    report,
    zero_memory,
)

TINY_ROW = Scenario("tiny", images=6, images_per_document=3, description="two stories of three images")


def allocator_peak(prof) -> int:
    """The most bytes the CPU allocator held at once during ``prof``, above what it held when profiling began (from
    its allocation and free events, in time order)."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_fake_trace_predicts_the_cpu_allocators_peak_of_a_real_step_within_20_percent(checkpointing):
    """What is compared: one forward + backward of the tiny preset on a 128-token row of six images (fp32, gradients
    dropped as they arrive, as the budget traces it), run twice from the same config:

    - for real on the CPU, measured by the allocator itself: ``torch.profiler`` records every allocation and free
      of PyTorch's CPU allocator, so the peak of their running sum is what the step really held above its start
      (activations, temporaries, gradients in flight; kernels' internal buffers included);
    - on fake tensors, which allocate nothing, by :func:`trace_training_step`: live tensor storages per op.

    The budget's paper numbers are the second kind; this bounds how far they are from the first.
    """
    config = dataclasses.replace(MMInterleavedConfig.tiny(), gradient_checkpointing=checkpointing)
    torch.manual_seed(0)
    real = MMInterleaved.from_config(config, word_level_tokenizer(config.language.llm_config["vocab_size"])).train()
    batch = packed_sequence(real, TINY_ROW, 128, mode=None)
    with gradients_dropped(real), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        real(batch).loss.backward()
    measured = allocator_peak(prof)

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = build_fake_model(config, mode, dtype=torch.float32)
    assert all(isinstance(p, FakeTensor) for p in fake.parameters())
    traced = trace_training_step(fake, packed_sequence(fake, TINY_ROW, 128, mode))

    assert traced.baseline_bytes == sum(p.numel() * 4 for p in real.parameters()) + sum(
        b.untyped_storage().nbytes() for b in real.buffers()) + sum(t.untyped_storage().nbytes() for t in (
            batch.input_ids, batch.document_ids, batch.images))
    assert abs(traced.activation_peak_bytes - measured) <= 0.2 * measured, (traced.activation_peak_bytes, measured)
    assert traced.flops > 0


def test_checkpointing_lowers_the_traced_peak_and_costs_recomputation():
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    traces = {}
    for on in (False, True):
        model = build_fake_model(dataclasses.replace(MMInterleavedConfig.tiny(), gradient_checkpointing=on), mode)
        traces[on] = trace_training_step(model, packed_sequence(model, TINY_ROW, 128, mode))
    assert traces[True].activation_peak_bytes < 0.8 * traces[False].activation_peak_bytes
    assert traces[False].flops < traces[True].flops < 1.5 * traces[False].flops


def test_zero_stages_shard_what_deepspeed_shards():
    params = ParameterCount(trainable=1_000_000_000, frozen=13_000_000_000)
    two, three = (zero_memory(stage, 8, params, activations=10 * GIB) for stage in (2, 3))
    assert two.weights == 2 * 14_000_000_000  # bf16, every rank holds all
    assert three.weights == 2 * 14_000_000_000 // 8 + 2 * 1_000_000_000  # a shard + the gathered working set
    for memory in (two, three):
        assert memory.gradients == 2 * 1_000_000_000 // 8  # bf16 gradient shard
        assert memory.optimizer == 12 * 1_000_000_000 // 8  # fp32 master + Adam's two moments
        assert memory.activations == 10 * GIB
    with pytest.raises(ValueError):
        zero_memory(1, 8, params, 0)


def test_plan_takes_the_largest_micro_batch_that_fits():
    params = ParameterCount(trainable=1_000_000_000, frozen=13_000_000_000)
    gpu = 80 * GIB
    chosen = plan(2, 8, params, activation_per_sequence=8 * GIB, gpu_bytes=gpu)
    assert chosen.fits(gpu) and chosen.micro_batch >= 1
    one_more = zero_memory(2, 8, params, (chosen.micro_batch + 1) * 8 * GIB)
    assert not dataclasses.replace(chosen, memory=one_more).fits(gpu)
    assert chosen.accumulation * chosen.micro_batch * 8 >= GLOBAL_BATCH
    too_big = plan(2, 8, params, activation_per_sequence=70 * GIB, gpu_bytes=gpu)
    assert too_big.micro_batch == 1 and not too_big.fits(gpu)


def test_paper_architecture_has_the_published_sizes():
    model = build_fake_model(MMInterleavedConfig.paper_architecture(), FakeTensorMode(allow_non_fake_inputs=True))
    count = {name: sum(p.numel() for p in model.get_submodule(name).parameters())
             for name in ("vision.vit", "language.llm", "decoder.unet", "decoder.vae")}
    assert count == {
        "vision.vit": 303_966_208,  # open_clip ViT-L/14's visual tower
        "language.llm": 13_015_864_320 + 2 * 2 * 5120,  # Vicuna-13B, plus the rows of <BoI> and <|image|>
        "decoder.unet": 865_910_724,  # SD 2.1's UNet
        "decoder.vae": 83_653_863,
    }
    assert model.image_size == (512, 512) and model.num_visual_tokens == 64
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not any(p.requires_grad for p in model.language.llm.parameters())
    assert model.config.gradient_checkpointing and model.config.decoder.unet_micro_batch == 8
    batch = packed_sequence(model, PAPER_SCENARIOS[0], SEQUENCE_TOKENS, FakeTensorMode(allow_non_fake_inputs=True))
    assert batch.input_ids.shape == (1, 2048) and batch.images.shape == (30, 3, 512, 512)


@pytest.mark.slow
def test_the_paper_preset_fits_80_gib_with_checkpointing_and_not_without():
    """The whole report (about a minute of tracing)."""
    lines = report(MMInterleavedConfig.paper_architecture(), 80 * GIB)
    rows = [line for line in lines if "GPUs, ZeRO-2" in line]
    assert len(rows) == 8
    assert all("GiB" in row and "none" not in row for row in rows[:4])  # checkpointing on
    assert all("over by" in row for row in rows[4:])  # checkpointing off
