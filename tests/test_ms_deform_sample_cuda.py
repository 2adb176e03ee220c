"""The CUDA kernel against the reference (run on a GPU machine: ``pytest -m gpu``)."""

import pytest
import torch
from ms_deform_cases import make_inputs

from cuda_ops import ms_deform_sample, ms_deform_sample_reference

pytestmark = pytest.mark.gpu

SHAPES = {
    "mmfs_llm": dict(shapes=((32, 32), (16, 16), (8, 8)) * 4, n=2, lq=256, m=16, d=64, p=8),
    "odd": dict(shapes=((7, 5), (3, 1), (1, 1)), n=3, lq=33, m=3, d=12, p=3, spread=(-0.5, 1.5)),
    "scalar_lanes": dict(shapes=((9, 9), (4, 4)), n=1, lq=17, m=2, d=5, p=4),
    "wide_channels": dict(shapes=((8, 8), (4, 4)), n=1, lq=9, m=2, d=384, p=4),
}
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def run(fn, inputs, grad_output):
    value, shapes, starts, locations, weights = (t.detach().clone() for t in inputs)
    for t in (value, locations, weights):
        t.requires_grad_()
    out = fn(value, shapes, starts, locations, weights)
    out.backward(grad_output)
    return [out.detach(), value.grad, locations.grad, weights.grad]


@pytest.fixture(autouse=True)
def cuda_backend(monkeypatch):
    monkeypatch.setenv("WEFT_DEFORM_BACKEND", "cuda")


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_matches_float64_reference(shape, dtype, deterministic):
    inputs = make_inputs(**SHAPES[shape], dtype=dtype, device="cuda")
    exact_inputs = [t.double() if t.is_floating_point() else t for t in inputs]
    grad_output = torch.randn(ms_deform_sample_reference(*exact_inputs).shape, device="cuda", dtype=torch.float64)
    expected = run(ms_deform_sample_reference, exact_inputs, grad_output)
    torch.use_deterministic_algorithms(deterministic)
    try:
        actual = run(ms_deform_sample, inputs, grad_output.to(dtype))
    finally:
        torch.use_deterministic_algorithms(False)
    tol = TOLERANCE[dtype]
    for name, a, e in zip(("output", "value", "locations", "weights"), actual, expected):
        assert a.dtype == dtype, name
        scale = e.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a.double() / scale, e / scale, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_deterministic_backward_is_bitwise_reproducible(dtype):
    # Every query samples near the centre, so many samples hit the same value rows.
    inputs = make_inputs(**SHAPES["mmfs_llm"], dtype=dtype, device="cuda", spread=(0.45, 0.55))
    grad_output = torch.randn(2, 256, 16 * 64, device="cuda", dtype=dtype)
    torch.use_deterministic_algorithms(True)
    try:
        first, second = (run(ms_deform_sample, inputs, grad_output) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_zero_queries_and_64bit_sizes():
    out = ms_deform_sample(*make_inputs(lq=0, dtype=torch.float32, device="cuda"))
    assert out.shape == (2, 0, 15)
    # More than 2**31 value elements (4 GiB of bf16): offsets must be 64-bit. A point at the
    # centre of the last pixel reads exactly that pixel.
    h, w, d = 2**15, 2**13, 8
    value = torch.randn(1, h * w, 1, d, device="cuda", dtype=torch.bfloat16)
    shapes = torch.tensor([[h, w]], device="cuda")
    starts = torch.zeros(1, dtype=torch.int64, device="cuda")
    locations = torch.tensor([(w - 0.5) / w, (h - 0.5) / h], device="cuda", dtype=torch.float64)
    locations = locations.to(torch.bfloat16).view(1, 1, 1, 1, 1, 2)
    weights = torch.ones(1, 1, 1, 1, 1, device="cuda", dtype=torch.bfloat16)
    x = locations[..., 0].double().item() * w - 0.5
    y = locations[..., 1].double().item() * h - 0.5
    expected = ms_deform_sample_reference(
        value[:, -3 * w :].double(), torch.tensor([[3, w]], device="cuda"), starts,
        torch.tensor([(x + 0.5) / w, (y - (h - 3) + 0.5) / 3], device="cuda", dtype=torch.float64).view(1, 1, 1, 1, 1, 2),
        weights.double(),
    )
    torch.testing.assert_close(ms_deform_sample(value, shapes, starts, locations, weights).double(), expected, rtol=1e-2, atol=1e-2)


def test_torch_compile_inductor_on_cuda():
    from test_ms_deform_sample import TinySampler

    module = TinySampler().cuda()
    value, shapes, starts, _, _ = make_inputs(shapes=((4, 4), (2, 2)), n=2, m=3, d=4, dtype=torch.float32, device="cuda")
    query = torch.randn(2, 5, 12, device="cuda")
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(query, value, shapes, starts), module(query, value, shapes, starts))
