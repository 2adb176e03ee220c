// CPU kernels for multi-scale deformable sampling, parallelised with at::parallel_for (OpenMP).
//
// Forward: one task per (n, q, m) query-head; the D channels of a sample are contiguous in value,
// so the inner loops are unit-stride and vectorise.
// Backward: one task per (n, m) batch-head. Each task owns value[n, :, m, :], so the value
// gradient is accumulated without atomics and in a fixed order: the CPU backward is deterministic.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../ms_deform_sample.h"

namespace weft {
namespace {

// Host-side check that the level table fits in S (cheap on CPU, where the tables are in memory).
void check_level_table(const int64_t* shapes, const int64_t* starts, const Sizes& sz) {
  for (int64_t l = 0; l < sz.levels; ++l) {
    const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
    TORCH_CHECK(h > 0 && w > 0, "ms_deform_sample: spatial_shapes[", l, "] = (", h, ", ", w,
                ") must be positive");
    TORCH_CHECK(starts[l] >= 0 && starts[l] + h * w <= sz.s, "ms_deform_sample: level ", l,
                " spans [", starts[l], ", ", starts[l] + h * w, ") but value has S = ", sz.s);
  }
}

template <typename scalar_t>
void forward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const scalar_t* locations, const scalar_t* weights, scalar_t* output,
                    const Sizes& sz) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pixel_stride = sz.m * sz.d;  // distance between neighbouring pixels in value
  at::parallel_for(0, sz.n * sz.lq * sz.m, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(sz.d);
    for (int64_t item = begin; item < end; ++item) {  // item = (n * Lq + q) * M + m
      const int64_t m = item % sz.m;
      const int64_t n = item / (sz.lq * sz.m);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const scalar_t* loc = locations + item * sz.levels * sz.points * 2;
      const scalar_t* attn = weights + item * sz.levels * sz.points;
      for (int64_t l = 0; l < sz.levels; ++l) {
        const scalar_t* level_value = value + ((n * sz.s + starts[l]) * sz.m + m) * sz.d;
        for (int64_t p = 0; p < sz.points; ++p, loc += 2, ++attn) {
          const Corners<acc_t> corners(static_cast<acc_t>(loc[0]), static_cast<acc_t>(loc[1]),
                                       shapes[2 * l], shapes[2 * l + 1]);
          const acc_t a = static_cast<acc_t>(*attn);
          for (int c = 0; c < 4; ++c) {
            if (corners.offset[c] < 0) continue;
            const acc_t wc = a * corners.weight[c];
            const scalar_t* v = level_value + corners.offset[c] * pixel_stride;
            for (int64_t k = 0; k < sz.d; ++k) acc[k] += wc * static_cast<acc_t>(v[k]);
          }
        }
      }
      scalar_t* out = output + item * sz.d;
      for (int64_t k = 0; k < sz.d; ++k) out[k] = static_cast<scalar_t>(acc[k]);
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad_output, const scalar_t* value, const int64_t* shapes,
                     const int64_t* starts, const scalar_t* locations, const scalar_t* weights,
                     at::opmath_type<scalar_t>* grad_value, scalar_t* grad_locations,
                     scalar_t* grad_weights, const Sizes& sz) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pixel_stride = sz.m * sz.d;
  const int64_t samples = sz.levels * sz.points;
  at::parallel_for(0, sz.n * sz.m, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> grad(sz.d);
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / sz.m, m = nm % sz.m;
      for (int64_t q = 0; q < sz.lq; ++q) {
        const int64_t item = (n * sz.lq + q) * sz.m + m;
        const scalar_t* g = grad_output + item * sz.d;
        for (int64_t k = 0; k < sz.d; ++k) grad[k] = static_cast<acc_t>(g[k]);
        for (int64_t l = 0; l < sz.levels; ++l) {
          const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
          const int64_t level_offset = ((n * sz.s + starts[l]) * sz.m + m) * sz.d;
          for (int64_t p = 0; p < sz.points; ++p) {
            const int64_t sample = item * samples + l * sz.points + p;
            const scalar_t* loc = locations + sample * 2;
            const Corners<acc_t> corners(static_cast<acc_t>(loc[0]), static_cast<acc_t>(loc[1]), h, w);
            const acc_t a = static_cast<acc_t>(weights[sample]);
            acc_t dot[4] = {0, 0, 0, 0};  // <grad, value at corner c>
            for (int c = 0; c < 4; ++c) {
              if (corners.offset[c] < 0) continue;
              const int64_t at = level_offset + corners.offset[c] * pixel_stride;
              const scalar_t* v = value + at;
              acc_t* gv = grad_value + at;
              const acc_t wc = a * corners.weight[c];
              acc_t sum = 0;
              for (int64_t k = 0; k < sz.d; ++k) {
                sum += grad[k] * static_cast<acc_t>(v[k]);
                gv[k] += wc * grad[k];
              }
              dot[c] = sum;
            }
            grad_weights[sample] = static_cast<scalar_t>(
                corners.weight[0] * dot[0] + corners.weight[1] * dot[1] +
                corners.weight[2] * dot[2] + corners.weight[3] * dot[3]);
            // Pixel gradients chained through pixel = loc * size - 0.5.
            grad_locations[sample * 2] =
                static_cast<scalar_t>(a * corners.grad_x(dot) * static_cast<acc_t>(w));
            grad_locations[sample * 2 + 1] =
                static_cast<scalar_t>(a * corners.grad_y(dot) * static_cast<acc_t>(h));
          }
        }
      }
    }
  });
}

void check_cpu(const at::Tensor& value) {
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_sample CPU kernel got a tensor on ",
              value.device());
}

}  // namespace

at::Tensor ms_deform_sample_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                    const at::Tensor& level_start_index,
                                    const at::Tensor& sampling_locations,
                                    const at::Tensor& attention_weights) {
  check_ms_deform_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                         attention_weights);
  check_cpu(value);
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto loc_c = sampling_locations.contiguous();
  const auto attn_c = attention_weights.contiguous();
  const Sizes sz = sizes_of(value_c, loc_c);
  check_level_table(shapes_c.data_ptr<int64_t>(), starts_c.data_ptr<int64_t>(), sz);
  auto output = at::empty({sz.n, sz.lq, sz.m * sz.d}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_sample_forward_cpu", [&] {
        forward_kernel<scalar_t>(value_c.data_ptr<scalar_t>(), shapes_c.data_ptr<int64_t>(),
                                 starts_c.data_ptr<int64_t>(), loc_c.data_ptr<scalar_t>(),
                                 attn_c.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), sz);
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_sample_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, bool /*deterministic: always true on CPU*/) {
  check_ms_deform_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                         attention_weights);
  check_cpu(value);
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto loc_c = sampling_locations.contiguous();
  const auto attn_c = attention_weights.contiguous();
  const Sizes sz = sizes_of(value_c, loc_c);
  check_level_table(shapes_c.data_ptr<int64_t>(), starts_c.data_ptr<int64_t>(), sz);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({sz.n, sz.lq, sz.m * sz.d}),
              "ms_deform_sample backward: grad_output has shape ", grad_output.sizes(),
              ", expected ", at::IntArrayRef({sz.n, sz.lq, sz.m * sz.d}));
  const auto grad_c = grad_output.contiguous().to(value.scalar_type());
  const auto acc_dtype = at::toOpMathType(value.scalar_type());
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  auto grad_locations = at::empty_like(loc_c);
  auto grad_weights = at::empty_like(attn_c);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_sample_backward_cpu", [&] {
        backward_kernel<scalar_t>(grad_c.data_ptr<scalar_t>(), value_c.data_ptr<scalar_t>(),
                                  shapes_c.data_ptr<int64_t>(), starts_c.data_ptr<int64_t>(),
                                  loc_c.data_ptr<scalar_t>(), attn_c.data_ptr<scalar_t>(),
                                  grad_value.data_ptr<at::opmath_type<scalar_t>>(),
                                  grad_locations.data_ptr<scalar_t>(),
                                  grad_weights.data_ptr<scalar_t>(), sz);
      });
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace weft
