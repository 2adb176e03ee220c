"""Does the paper preset train on 80 GB GPUs? A measured memory and compute budget that needs no GPU.

    python -m pipelines.training.budget [--unet-micro-batch N] [--gpu-memory-gib 80]

takes a minute or two on one CPU thread:

1. builds :meth:`MMInterleavedConfig.paper_architecture` (CLIP ViT-L/14, Vicuna-13B, SD-2.1-base at 512 px, 64 visual
   tokens, random weights in the published shapes) under ``FakeTensorMode`` with bf16 parameters, as DeepSpeed's bf16
   mode casts them: nothing is allocated and no file is read;
2. traces one training step (forward + backward) of one packed 2048-token sequence per scenario with
   :func:`model.memory_trace.trace_training_step`, with gradient checkpointing on and off;
3. adds what DeepSpeed ZeRO-2 and ZeRO-3 keep on each GPU (bf16 weights, gradient shard, fp32 master weights and Adam
   moments, the reduce bucket) for 8-64 GPUs at the paper's global batch, and prints the plan and its assumptions.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from model.config import MMInterleavedConfig
from model.memory_trace import Scenario, build_fake_model, packed_sequence, trace_training_step

GIB = 2**30
SEQUENCE_TOKENS = 2048
"""The paper's context length (Tab. 9)."""
GLOBAL_BATCH = round(11e9 / 15000 / SEQUENCE_TOKENS)
"""Sequences per optimizer step: "pre-trained for 15000 steps with 11 billion tokens visited" (Sec. 4.1) -> 358 of 2048
tokens, what 128 GPUs would give at the release config's mean per-GPU batch (2 for each of three pair datasets, 4 for
MMC4 sampled twice as often: 2.8)."""
GPU_COUNTS = (8, 16, 32, 64)
RESERVED_BYTES = 4 * GIB
"""Left for what no trace sees: the CUDA context, NCCL's buffers, the caching allocator's rounding and fragmentation."""
REDUCE_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's default ``reduce_bucket_size``: gradients are reduce-scattered through one bucket of this many
elements (bf16)."""
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000
"""DeepSpeed's default ``stage3_max_live_parameters``: the most gathered (unsharded) parameters ZeRO-3 keeps at once."""

PAPER_SCENARIOS = (
    Scenario("pairs", 30, 1, "image-text pairs at the release's cap of 30 images per sequence"),
    Scenario("mmc4", 15, 6, "MMC4 at the release's cap of 15 images per sequence, <= 6 per document"),
)


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    frozen: int

    @classmethod
    def of(cls, module: nn.Module) -> "ParameterCount":
        counts = [0, 0]
        for param in module.parameters():
            counts[param.requires_grad] += param.numel()
        return cls(trainable=counts[1], frozen=counts[0])


@dataclass(frozen=True)
class GpuMemory:
    """Bytes on one GPU at the step's peak (the backward of a micro-batch)."""

    weights: int
    gradients: int
    optimizer: int
    buffers: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.buffers + self.activations


def zero_memory(stage: int, gpus: int, params: ParameterCount, activations: int) -> GpuMemory:
    """What DeepSpeed ZeRO ``stage`` (2 or 3) keeps per GPU with bf16 parameters: bf16 weights (all of them for
    ZeRO-2; a 1/N shard plus up to ``STAGE3_MAX_LIVE_PARAMETERS`` gathered ones for ZeRO-3), a 1/N shard of the bf16
    gradients and of the optimizer's fp32 master weights + Adam moments (12 bytes per trainable parameter), and the
    reduce bucket. ``activations``: the micro-batch's traced activation peak."""
    if stage not in (2, 3):
        raise ValueError(f"ZeRO stage must be 2 or 3, got {stage}")
    total = params.trainable + params.frozen
    if stage == 2:
        weights = 2 * total
    else:
        weights = math.ceil(2 * total / gpus) + 2 * min(STAGE3_MAX_LIVE_PARAMETERS, total)
    return GpuMemory(
        weights=weights,
        gradients=math.ceil(2 * params.trainable / gpus),
        optimizer=math.ceil(12 * params.trainable / gpus),
        buffers=2 * REDUCE_BUCKET_ELEMENTS,
        activations=activations,
    )


@dataclass(frozen=True)
class Plan:
    """How one GPU count trains the global batch under one ZeRO stage."""

    gpus: int
    stage: int
    micro_batch: int
    """Sequences per micro-batch: the most that fit (at least 1), at most this GPU's share of the global batch."""
    accumulation: int
    """Micro-batches per step, rounded up: the step trains ``gpus * micro_batch * accumulation >= GLOBAL_BATCH``."""
    memory: GpuMemory

    def fits(self, gpu_bytes: int) -> bool:
        return self.memory.total + RESERVED_BYTES <= gpu_bytes


def plan(stage: int, gpus: int, params: ParameterCount, activation_per_sequence: int, gpu_bytes: int) -> Plan:
    """The largest micro-batch that fits ``gpu_bytes``, with activations growing linearly in the sequences of a
    micro-batch: what is saved for the backward does, the transient part of the peak does not, so this is an upper
    bound (traced for the paper preset's MMC4 scenario: 8.0 GiB for one sequence, 13.3 for two, 26.4 for four)."""
    share = math.ceil(GLOBAL_BATCH / gpus)
    micro_batch = 1
    for m in range(2, share + 1):
        if zero_memory(stage, gpus, params, m * activation_per_sequence).total + RESERVED_BYTES > gpu_bytes:
            break
        micro_batch = m
    memory = zero_memory(stage, gpus, params, micro_batch * activation_per_sequence)
    return Plan(gpus, stage, micro_batch, math.ceil(GLOBAL_BATCH / (gpus * micro_batch)), memory)


def gib(n: int | float) -> str:
    return f"{n / GIB:.1f} GiB"


def report(config: MMInterleavedConfig, gpu_bytes: int) -> list[str]:
    """Trace ``config`` (the paper preset) with checkpointing on and off and return the plan as lines of text."""
    traces = {}
    for on in (True, False):
        mode = FakeTensorMode(allow_non_fake_inputs=True)  # token ids and the image layout stay real: they set shapes
        model = build_fake_model(dataclasses.replace(config, gradient_checkpointing=on), mode)
        traces[on] = {s.name: trace_training_step(model, packed_sequence(model, s, SEQUENCE_TOKENS, mode))
                      for s in PAPER_SCENARIOS}
    parts = {name: ParameterCount.of(model.get_submodule(name)) for name in ("vision", "language", "decoder")}
    params = ParameterCount.of(model)

    lines = [
        "MM-Interleaved paper preset: CLIP ViT-L/14 (frozen) + Vicuna-13B (frozen) + SD-2.1-base UNet at 512 px "
        f"(64x64 latents), {config.num_visual_tokens} visual tokens, {SEQUENCE_TOKENS}-token sequences, "
        f"UNet micro-batch {config.decoder.unet_micro_batch or 'all'}",
        "",
        "Parameters       trainable      frozen",
    ]
    for name, count in [*parts.items(), ("total", params)]:
        lines.append(f"  {name:12s} {count.trainable / 1e9:8.3f} B {count.frozen / 1e9:9.3f} B")
    lines += ["", "One training step (forward + backward) of one sequence, traced; bf16 parameters "
                  f"({gib(2 * (params.trainable + params.frozen))}) not included:",
              "                  activation peak            step FLOPs",
              "  scenario     ckpt on    ckpt off       ckpt on   ckpt off"]
    for s in PAPER_SCENARIOS:
        on, off = traces[True][s.name], traces[False][s.name]
        lines.append(f"  {s.name:8s} {gib(on.activation_peak_bytes):>11s} {gib(off.activation_peak_bytes):>11s}"
                     f" {on.flops / 1e12:>10.0f} TF {off.flops / 1e12:>7.0f} TF   {s.description}")
    lines += ["", f"Per GPU at the paper's global batch of {GLOBAL_BATCH} sequences ({gib(gpu_bytes)} GPUs, "
                  f"{gib(RESERVED_BYTES)} kept free, the worst scenario's activations):"]
    for on in (True, False):
        worst = max(t.activation_peak_bytes for t in traces[on].values())
        lines += ["", f"  checkpointing {'on' if on else 'off'}   weights  grads  Adam+fp32  buffers  | peak at 1 seq"
                      " | most seq. that fit: m x accum.  peak"]
        for gpus in GPU_COUNTS:
            for stage in (2, 3):
                one = zero_memory(stage, gpus, params, worst)
                best = plan(stage, gpus, params, worst, gpu_bytes)
                over = one.total + RESERVED_BYTES - gpu_bytes
                most = (f"{best.micro_batch:>3d} x {best.accumulation:<3d} {gib(best.memory.total):>9s}" if over <= 0
                        else f"none: 1 seq. is over by {gib(over)}")
                lines.append(f"  {gpus:3d} GPUs, ZeRO-{stage} {gib(one.weights):>9s} {gib(one.gradients):>7s}"
                             f" {gib(one.optimizer):>9s} {gib(one.buffers):>8s}  | {gib(one.total):>13s} | {most:>30s}")
    step = {s.name: GLOBAL_BATCH * traces[True][s.name].flops for s in PAPER_SCENARIOS}
    hours = {name: 15000 * flops / (0.4 * 312e12) / 3600 for name, flops in step.items()}
    lines += ["", f"Step FLOPs with checkpointing ({GLOBAL_BATCH} sequences): "
              + ", ".join(f"{name} {flops / 1e15:.0f} PFLOP" for name, flops in step.items())
              + "; 15k steps at 40% of an A100's 312 bf16 TFLOP/s: "
              + ", ".join(f"{name} {h:,.0f} GPU-hours" for name, h in hours.items()),
              "", "Assumptions:"]
    lines += [f"  - {a}" for a in ASSUMPTIONS]
    return lines


ASSUMPTIONS = (
    "one packed 2048-token sequence per scenario, every image trained (text before it in its document): the worst "
    "case; mixed data trains fewer images (pairs whose image comes first, the first image of a document)",
    "bf16 parameters, activations and gradients (DeepSpeed bf16; the release used fp16, the same sizes)",
    "activations traced op by op on fake tensors: live tensor storages, not the allocator's rounding or "
    "fragmentation, kernel workspaces or the CUDA context (the reserve covers them); attention traced with "
    "PyTorch's fused CPU kernel, O(T) memory like the CUDA flash / memory-efficient kernels",
    "gradients leave the GPU's working set as they are produced (ZeRO reduce-scatters them through one bucket of "
    f"{REDUCE_BUCKET_ELEMENTS:.0e} bf16 elements into a 1/N shard); the optimizer step's fp32 copy of the gradient "
    "shard comes after the activations are freed and is smaller than them",
    "ZeRO-2: all bf16 weights replicated; ZeRO-3: a 1/N shard plus at most "
    f"{STAGE3_MAX_LIVE_PARAMETERS:.0e} gathered parameters (DeepSpeed's defaults); both: 1/N of the bf16 gradients and "
    "of the fp32 master weights + Adam moments (12 bytes per trainable parameter)",
    "a micro-batch of m sequences needs m times one sequence's activation peak (an upper bound: the transient part "
    f"of the peak does not grow with m); accumulation rounds the step up to >= {GLOBAL_BATCH} sequences",
    "FLOPs: matrix multiplies, convolutions and attention (torch.utils.flop_counter), the recomputation included; "
    "elementwise ops, the deformable sampling and the frozen ViT's fused attention are not counted (< 1%)",
    "weft's train.py runs ZeRO 0-2 today; the ZeRO-3 rows are what it would take",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.training.budget", description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet-micro-batch", type=int, default=None,
                        help="trained images per UNet call (default: the paper preset's)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default: 80)")
    args = parser.parse_args(argv)
    config = MMInterleavedConfig.paper_architecture()
    if args.unet_micro_batch is not None:
        config.decoder = dataclasses.replace(config.decoder, unet_micro_batch=args.unet_micro_batch)
    torch.set_num_threads(1)  # fake tensors compute nothing; the few real ops (token layout) are small
    print("\n".join(report(config, int(args.gpu_memory_gib * GIB))))


if __name__ == "__main__":
    main()
