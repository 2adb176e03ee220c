"""Memory and FLOPs of one training step, traced op by op: on real tensors, or on fake ones that allocate nothing.

:class:`StorageTracker` is a dispatch mode that counts the bytes of every tensor storage an op creates from that op
until Python frees the storage (a weak reference to it), and keeps the peak. Under
``torch._subclasses.FakeTensorMode`` the same code runs a model of any size on a laptop: fake tensors carry shapes,
dtypes and storage sizes but no data, so a 13B-parameter step is traced in seconds without allocating it.

What the count is: the sum of live tensor storages, as a caching allocator would hold them for the tensors alone.
Not counted: the allocator's rounding and fragmentation, kernel workspaces allocated outside tensors, the CUDA
context, and storages resized in place (``UntypedStorage.resize_``, which no op in this model uses).

:func:`build_fake_model` builds a config's model on fake tensors and :func:`packed_sequence` a synthetic packed row of a
:class:`Scenario` for it; :mod:`pipelines.training.budget` plans the paper preset's training with them.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import PreTrainedTokenizerFast

from model.batch import InterleavedBatch
from model.config import MMInterleavedConfig
from model.mm_interleaved import MMInterleaved

aten = torch.ops.aten


class StorageTracker(TorchDispatchMode):
    """Bytes of tensor storages alive (``current``) and their most at once (``peak``), counted per storage (views of
    a counted storage add nothing). Storages that exist before the mode starts count from :meth:`track`."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._counted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def track(self, *tensors: Tensor) -> None:
        """Count the storages of ``tensors`` (each once) from now until they are freed."""
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage in self._counted:
                continue
            size = storage.nbytes()
            self._counted[storage] = size
            weakref.finalize(storage, self._release, size)
            self.current += size
            self.peak = max(self.peak, self.current)

    def _release(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(*(t for t in tree_leaves(out) if isinstance(t, Tensor)))
        return out


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                  **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}
"""FLOP formulas for the CPU's fused attention, which ``FlopCounterMode`` does not know: the same as for the CUDA
kernels (a fake trace runs on the CPU's ops)."""


@dataclass(frozen=True)
class StepTrace:
    """One traced forward + backward.

    Attributes:
        baseline_bytes: storages alive when the step began (parameters, buffers, the batch).
        peak_bytes: the most storage bytes alive at once during the step, the baseline included.
        flops: matrix-multiply, convolution and attention FLOPs of the forward, the backward and any recomputation
            (``torch.utils.flop_counter``; not counted: elementwise ops, the deformable sampling, and fused kernels it
            has no formula for, such as ``nn.MultiheadAttention``'s inference fast path in the frozen ViT).
    """

    baseline_bytes: int
    peak_bytes: int
    flops: int

    @property
    def activation_peak_bytes(self) -> int:
        """What the step needs on top of the model and its batch: activations, temporaries and gradients in flight."""
        return self.peak_bytes - self.baseline_bytes


def _drop_gradient(param: Tensor) -> None:
    param.grad = None


@contextmanager
def gradients_dropped(model: nn.Module) -> Iterator[None]:
    """Inside, each parameter's gradient is dropped as soon as it is accumulated: a ZeRO optimizer reduces gradients
    into per-rank shards as they arrive, which a plan counts on its own."""
    handles = [p.register_post_accumulate_grad_hook(_drop_gradient) for p in model.parameters() if p.requires_grad]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def trace_training_step(model: nn.Module, batch: InterleavedBatch) -> StepTrace:
    """Trace ``model(batch).loss.backward()`` (gradients dropped, :func:`gradients_dropped`) twice: once for memory,
    once for FLOPs. Apart, because ``FlopCounterMode``'s module tracking keeps tensors alive (35 GiB more at the paper's
    scale), so counting FLOPs in the same pass would overstate the memory.

    Randomness (noise, timesteps, condition dropout) comes from the global generator: with fake tensors it changes no
    size, with real ones seed it before the call for a reproducible step.
    """
    tracker = StorageTracker()
    tracker.track(*model.parameters(), *model.buffers(), *(t for t in vars(batch).values() if isinstance(t, Tensor)))
    baseline = tracker.current
    with gradients_dropped(model):
        with tracker:
            model(batch).loss.backward()
        with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as flops:
            model(batch).loss.backward()
    return StepTrace(baseline, tracker.peak, flops.get_total_flops())


@dataclass(frozen=True)
class Scenario:
    """A packed row to trace (:func:`packed_sequence`): ``images`` in documents of at most ``images_per_document``,
    every image after some text of its document (so every image is trained, the worst case)."""

    name: str
    images: int
    images_per_document: int
    description: str


def word_level_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer of ``vocab_size`` ids (``<unk>``, ``<s>``, ``</s>`` and filler words) built in memory: the traced
    model needs its vocabulary size and special tokens, not its words."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_fake_model(config: MMInterleavedConfig, mode: FakeTensorMode,
                     dtype: torch.dtype = torch.bfloat16) -> MMInterleaved:
    """The model of ``config`` with fake parameters of ``dtype`` (a ``llm_config`` LLM: its vocabulary sizes the
    tokenizer), in training mode."""
    tokenizer = word_level_tokenizer(config.language.llm_config["vocab_size"])
    with mode, default_dtype(dtype):
        return MMInterleaved.from_config(config, tokenizer).train()


def packed_sequence(model: MMInterleaved, scenario: Scenario, tokens: int,
                    mode: FakeTensorMode | None) -> InterleavedBatch:
    """One row of ``tokens`` tokens holding ``scenario``'s images: documents ``<s> (text <BoI> image tokens)... </s>``
    with the text spread evenly before the images, the rest of the row filled with text of the last document. The
    text is ``<unk>`` (any id sizes a step alike). Images are fake under ``mode``, else random pixels."""
    n = model.num_visual_tokens
    sizes = [min(scenario.images_per_document, scenario.images - start)
             for start in range(0, scenario.images, scenario.images_per_document)]
    text = (tokens - 2 * len(sizes) - scenario.images * (n + 1)) // scenario.images
    if text < 1:
        raise ValueError(f"{scenario.images} images of {n} tokens do not fit {tokens} tokens with text before each")
    word = model.tokenizer.unk_token_id
    ids: list[int] = []
    documents: list[int] = []
    for document, size in enumerate(sizes):
        body = [model.tokenizer.bos_token_id]
        for _ in range(size):
            body += [word] * text + [model.boi_token_id] + [model.image_token_id] * n
        body.append(model.tokenizer.eos_token_id)
        ids += body
        documents += [document] * len(body)
    ids += [word] * (tokens - len(ids))
    documents += [len(sizes) - 1] * (tokens - len(documents))
    shape = (scenario.images, 3, *model.image_size)
    if mode is None:
        images = torch.rand(shape)
    else:
        with mode:
            images = torch.empty(shape)
    return InterleavedBatch(torch.tensor([ids]), torch.tensor([documents]), images)
