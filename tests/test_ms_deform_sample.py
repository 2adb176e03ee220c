"""The deformable-sampling op on CPU: reference, CPU kernel, op registration, compile, build."""

import warnings

import pytest
import torch
from ms_deform_cases import make_inputs, naive_ms_deform_sample

import cuda_ops
from cuda_ops import build, ms_deform_sample, ms_deform_sample_reference
from cuda_ops.build import KernelBuildError, find_cuda_home, load_kernels

EDGE_CASES = {
    "far_outside": dict(spread=(-1.5, 2.5)),
    "one_by_one_levels": dict(shapes=((1, 1), (1, 1), (2, 2))),
    "odd_channels": dict(d=7, m=2),
    "many_levels": dict(shapes=tuple((4 - i % 3, 3 + i % 2) for i in range(32)), lq=3, p=2),
    "single_point": dict(p=1, lq=1, n=1, m=1, d=1),
}


@pytest.fixture
def cpu_kernels(monkeypatch):
    monkeypatch.setenv("WEFT_DEFORM_BACKEND", "cpu")
    return load_kernels("cpu")


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("WEFT_DEFORM_BACKEND", "reference")


def grads_of(fn, inputs, grad_output):
    value, shapes, starts, locations, weights = (t.detach().clone() for t in inputs)
    for t in (value, locations, weights):
        t.requires_grad_()
    out = fn(value, shapes, starts, locations, weights)
    out.backward(grad_output)
    return out.detach(), value.grad, locations.grad, weights.grad


@pytest.mark.parametrize("case", ["default", *EDGE_CASES])
def test_reference_matches_naive_loops(case):
    inputs = make_inputs(**EDGE_CASES.get(case, {}))
    torch.testing.assert_close(ms_deform_sample_reference(*inputs), naive_ms_deform_sample(*inputs))


@pytest.mark.parametrize("case", ["default", *EDGE_CASES])
def test_cpu_kernel_matches_reference(case, cpu_kernels):
    inputs = make_inputs(**EDGE_CASES.get(case, {}))
    grad_output = torch.randn(ms_deform_sample_reference(*inputs).shape, dtype=torch.float64)
    expected = grads_of(ms_deform_sample_reference, inputs, grad_output)
    actual = grads_of(ms_deform_sample, inputs, grad_output)
    for name, a, e in zip(("output", "value", "locations", "weights"), actual, expected):
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
)
def test_cpu_kernel_low_precision_accumulates_in_fp32(dtype, tolerance, cpu_kernels):
    inputs = make_inputs(shapes=((16, 16), (8, 8), (4, 4)), lq=20, d=32, p=8, dtype=dtype, spread=(0, 1))
    exact = naive_ms_deform_sample(*(t.double() if t.is_floating_point() else t for t in inputs))
    out = ms_deform_sample(*inputs)
    assert out.dtype == dtype
    # Error of one rounding of the output, not of a chain of rounded partial sums.
    torch.testing.assert_close(out.double(), exact, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend, monkeypatch):
    monkeypatch.setenv("WEFT_DEFORM_BACKEND", backend)
    # Keep sample points away from pixel centres, where bilinear sampling has kinks.
    value, shapes, starts, locations, weights = make_inputs(n=1, lq=3, m=2, d=3, p=2, seed=3)
    locations = (locations * torch.tensor([6.0, 5.0])).round() / torch.tensor([6.0, 5.0]) + 0.013
    tensors = [value, locations, weights]
    for t in tensors:
        t.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_sample(v, shapes, starts, loc, w), tensors, eps=1e-6, atol=1e-5
    )
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_sample_reference(v, shapes, starts, loc, w), tensors, eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_zero_queries(backend, monkeypatch):
    monkeypatch.setenv("WEFT_DEFORM_BACKEND", backend)
    inputs = make_inputs(lq=0)
    grad_output = torch.zeros(2, 0, 15, dtype=torch.float64)
    out, grad_value, grad_locations, grad_weights = grads_of(ms_deform_sample, inputs, grad_output)
    assert out.shape == (2, 0, 15)
    assert grad_locations.shape == inputs[3].shape and grad_weights.shape == inputs[4].shape
    assert torch.count_nonzero(grad_value) == 0


def test_cpu_backward_is_bitwise_deterministic(cpu_kernels):
    inputs = make_inputs(shapes=((8, 8), (4, 4)), lq=64, d=16, p=8, dtype=torch.float32)
    grad_output = torch.randn(2, 64, 48)
    first = grads_of(ms_deform_sample, inputs, grad_output)
    second = grads_of(ms_deform_sample, inputs, grad_output)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(backend, monkeypatch):
    monkeypatch.setenv("WEFT_DEFORM_BACKEND", backend)
    value, shapes, starts, locations, weights = make_inputs(dtype=torch.float32)
    for t in (value, locations, weights):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.weft.ms_deform_sample.default, (value, shapes, starts, locations, weights))


class TinySampler(torch.nn.Module):
    """A minimal MMFS-like block: predicts offsets and weights, samples, projects."""

    def __init__(self, dim=12, heads=3, levels=2, points=2):
        super().__init__()
        self.heads, self.levels, self.points = heads, levels, points
        self.offsets = torch.nn.Linear(dim, heads * levels * points * 2)
        self.logits = torch.nn.Linear(dim, heads * levels * points)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, query, value, shapes, starts):
        n, lq, _ = query.shape
        shape = (n, lq, self.heads, self.levels, self.points)
        locations = 0.5 + 0.1 * torch.tanh(self.offsets(query)).view(*shape, 2)
        weights = self.logits(query).view(n, lq, self.heads, -1).softmax(-1).view(shape)
        return self.out(ms_deform_sample(value, shapes, starts, locations, weights))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_torch_compile_full_graph(backend, monkeypatch):
    monkeypatch.setenv("WEFT_DEFORM_BACKEND", backend)
    torch._dynamo.reset()
    module = TinySampler()
    value, shapes, starts, _, _ = make_inputs(shapes=((4, 4), (2, 2)), n=2, m=3, d=4, dtype=torch.float32)
    query = torch.randn(2, 5, 12)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    expected = module(query, value, shapes, starts)
    actual = compiled(query, value, shapes, starts)
    torch.testing.assert_close(actual, expected)
    actual.sum().backward()
    assert module.offsets.weight.grad is not None and module.offsets.weight.grad.abs().sum() > 0


def test_invalid_inputs_name_the_problem():
    value, shapes, starts, locations, weights = make_inputs()
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_sample(value, shapes, starts, locations, weights[..., :1])
    with pytest.raises(TypeError, match="share one floating dtype"):
        ms_deform_sample(value.float(), shapes, starts, locations, weights)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_sample(value, shapes[:2], starts, locations, weights)


def test_cpu_kernel_rejects_level_table_beyond_value(cpu_kernels):
    value, shapes, starts, locations, weights = make_inputs()
    with pytest.raises(RuntimeError, match="level 3 spans"):
        ms_deform_sample(value[:, :-1], shapes, starts, locations, weights)


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("WEFT_DEFORM_BACKEND", "fastest")
    with pytest.raises(ValueError, match="WEFT_DEFORM_BACKEND"):
        ms_deform_sample(*make_inputs())


def test_forced_cuda_backend_refuses_cpu_tensors(monkeypatch):
    monkeypatch.setenv("WEFT_DEFORM_BACKEND", "cuda")
    with pytest.raises(ValueError, match="on cpu"):
        ms_deform_sample(*make_inputs())


@pytest.fixture
def broken_cpu_build(tmp_path, monkeypatch):
    """Point the CPU build at a source that does not compile, in a fresh cache."""
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++;\n")
    monkeypatch.setenv("WEFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(build.SOURCES, "cpu", [broken])
    monkeypatch.setattr(cuda_ops.ops, "_warned_fallback", set())
    load_kernels.cache_clear()
    yield
    load_kernels.cache_clear()


def test_failed_build_warns_once_and_falls_back(broken_cpu_build, monkeypatch):
    monkeypatch.setenv("WEFT_DEFORM_BACKEND", "auto")
    inputs = make_inputs()
    with pytest.warns(UserWarning, match=r"compiler log: .*cpu-[0-9a-f]+\.log") as record:
        out = ms_deform_sample(*inputs)
    log_path = record[0].message.args[0].split("compiler log: ")[1].split(";")[0]
    assert "this is not C++" in open(log_path).read()
    torch.testing.assert_close(out, ms_deform_sample_reference(*inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms_deform_sample(*inputs)  # the second call is silent


def test_failed_build_is_an_error_when_forced(broken_cpu_build, monkeypatch):
    monkeypatch.setenv("WEFT_DEFORM_BACKEND", "cpu")
    with pytest.raises(KernelBuildError, match="compiler log"):
        ms_deform_sample(*make_inputs())


@pytest.mark.skipif(find_cuda_home() is None, reason="nvcc not found")
def test_cuda_extension_compiles_and_links():
    """The CUDA code's guard on machines without a GPU: nvcc compiles it and it links and imports."""
    module = load_kernels("cuda")
    assert callable(module.forward) and callable(module.backward)
    with pytest.raises(RuntimeError, match="CUDA kernel got a tensor on cpu"):
        module.forward(*make_inputs(dtype=torch.float32))
