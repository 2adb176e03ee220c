// CUDA kernels for multi-scale deformable sampling.
//
// Work decomposition: a *group* of G lanes (a power of two <= 32, inside one warp) serves one
// (n, q, m) query-head; lane j holds channels [j * VEC, j * VEC + VEC) of each chunk of G * VEC
// channels, read with one 16-byte load per corner (VEC = 16 / sizeof(scalar_t) when D and the
// pointers allow it, else 1). All offsets are int64. Accumulation is in at::opmath_type (float for
// half and bfloat16). There is no im2col_step: the whole batch is one launch.
//
// Backward: the location and weight gradients of a sample need <grad_out, value corner> over all
// D channels; the group reduces them with warp shuffles and lane 0 writes them (no atomics).
// The value gradient is either scattered with float atomics (fast, order-dependent; 16-byte vector
// atomics on Hopper) or, in deterministic mode, gathered: every (sample, corner) gets the key of
// the value row it touches, a stable sort groups equal keys in a fixed order, and one group sums
// each key's run.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../ms_deform_sample.h"

namespace weft {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest
constexpr int64_t kNoKey = std::numeric_limits<int64_t>::max();

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
}

// Lane layout of the calling thread's group.
struct Group {
  int size;       // G
  int lane;       // 0 .. G-1
  unsigned mask;  // the group's lanes within the warp, for shuffles
  int64_t first;  // first group index of this thread
  int64_t stride; // groups in the grid

  __device__ explicit Group(int group_size) : size(group_size) {
    lane = threadIdx.x % group_size;
    const unsigned warp_lane = threadIdx.x % 32;
    mask = group_size == 32 ? 0xffffffffu
                            : ((1u << group_size) - 1u) << (warp_lane / group_size * group_size);
    const int per_block = blockDim.x / group_size;
    first = int64_t(blockIdx.x) * per_block + threadIdx.x / group_size;
    stride = int64_t(gridDim.x) * per_block;
  }

  template <typename T>
  __device__ __forceinline__ T sum(T x) const {
    for (int offset = size / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(mask, x, offset, size);
    return x;
  }
};

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                   const int64_t* __restrict__ starts, const scalar_t* __restrict__ locations,
                   const scalar_t* __restrict__ weights, scalar_t* __restrict__ output, Sizes sz,
                   int group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  const Group group(group_size);
  const int64_t items = sz.n * sz.lq * sz.m;
  const int64_t pixel_stride = sz.m * sz.d;
  for (int64_t item = group.first; item < items; item += group.stride) {  // (n * Lq + q) * M + m
    const int64_t m = item % sz.m;
    const int64_t n = item / (sz.lq * sz.m);
    for (int64_t c0 = int64_t(group.lane) * VEC; c0 < sz.d; c0 += int64_t(group.size) * VEC) {
      acc_t acc[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = acc_t(0);
      const scalar_t* loc = locations + item * sz.levels * sz.points * 2;
      const scalar_t* attn = weights + item * sz.levels * sz.points;
      for (int64_t l = 0; l < sz.levels; ++l) {
        const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
        const scalar_t* level_value = value + ((n * sz.s + starts[l]) * sz.m + m) * sz.d + c0;
        for (int64_t p = 0; p < sz.points; ++p, loc += 2, ++attn) {
          const Corners<acc_t> corners(static_cast<acc_t>(loc[0]), static_cast<acc_t>(loc[1]), h, w);
          const acc_t a = static_cast<acc_t>(*attn);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (corners.offset[c] < 0) continue;
            const acc_t wc = a * corners.weight[c];
            const auto v = load_pack<scalar_t, VEC>(level_value + corners.offset[c] * pixel_stride);
#pragma unroll
            for (int k = 0; k < VEC; ++k) acc[k] += wc * static_cast<acc_t>(v.v[k]);
          }
        }
      }
      Pack<scalar_t, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) out.v[k] = static_cast<scalar_t>(acc[k]);
      *reinterpret_cast<Pack<scalar_t, VEC>*>(output + item * sz.d + c0) = out;
    }
  }
}

// dst[k] += x[k] for k < VEC, atomically per element. On Hopper (sm_90+) float runs of four go as
// one 16-byte vector atomic (global memory only; dst is 16-byte aligned whenever VEC > 1, see
// vector_width): the value gradient's scatter is bound by the number of atomics, and this cuts
// them fourfold.
template <typename acc_t, int VEC>
__device__ __forceinline__ void atomic_add_pack(acc_t* dst, const acc_t (&x)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (std::is_same_v<acc_t, float> && VEC % 4 == 0) {
#pragma unroll
    for (int k = 0; k < VEC; k += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + k), make_float4(x[k], x[k + 1], x[k + 2], x[k + 3]));
    }
    return;
  }
#endif
#pragma unroll
  for (int k = 0; k < VEC; ++k) atomicAdd(dst + k, x[k]);
}

// Location and weight gradients; with SCATTER_VALUE_GRAD also the value gradient (atomics).
template <typename scalar_t, int VEC, bool SCATTER_VALUE_GRAD>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                    const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                    const scalar_t* __restrict__ locations, const scalar_t* __restrict__ weights,
                    at::opmath_type<scalar_t>* __restrict__ grad_value,
                    scalar_t* __restrict__ grad_locations, scalar_t* __restrict__ grad_weights,
                    Sizes sz, int group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  const Group group(group_size);
  const int64_t items = sz.n * sz.lq * sz.m;
  const int64_t pixel_stride = sz.m * sz.d;
  for (int64_t item = group.first; item < items; item += group.stride) {
    const int64_t m = item % sz.m;
    const int64_t n = item / (sz.lq * sz.m);
    const scalar_t* grad = grad_output + item * sz.d;
    for (int64_t l = 0; l < sz.levels; ++l) {
      const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
      const int64_t level_offset = ((n * sz.s + starts[l]) * sz.m + m) * sz.d;
      for (int64_t p = 0; p < sz.points; ++p) {
        const int64_t sample = (item * sz.levels + l) * sz.points + p;
        const Corners<acc_t> corners(static_cast<acc_t>(locations[2 * sample]),
                                     static_cast<acc_t>(locations[2 * sample + 1]), h, w);
        const acc_t a = static_cast<acc_t>(weights[sample]);
        acc_t dot[4] = {0, 0, 0, 0};
        for (int64_t c0 = int64_t(group.lane) * VEC; c0 < sz.d; c0 += int64_t(group.size) * VEC) {
          const auto g = load_pack<scalar_t, VEC>(grad + c0);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (corners.offset[c] < 0) continue;
            const int64_t at = level_offset + corners.offset[c] * pixel_stride + c0;
            const auto v = load_pack<scalar_t, VEC>(value + at);
            const acc_t wc = a * corners.weight[c];
            acc_t contribution[VEC];
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              const acc_t gk = static_cast<acc_t>(g.v[k]);
              dot[c] += gk * static_cast<acc_t>(v.v[k]);
              contribution[k] = wc * gk;
            }
            if constexpr (SCATTER_VALUE_GRAD) atomic_add_pack<acc_t, VEC>(grad_value + at, contribution);
          }
        }
#pragma unroll
        for (int c = 0; c < 4; ++c) dot[c] = group.sum(dot[c]);
        if (group.lane == 0) {
          grad_weights[sample] = static_cast<scalar_t>(
              corners.weight[0] * dot[0] + corners.weight[1] * dot[1] +
              corners.weight[2] * dot[2] + corners.weight[3] * dot[3]);
          grad_locations[2 * sample] =
              static_cast<scalar_t>(a * corners.grad_x(dot) * static_cast<acc_t>(w));
          grad_locations[2 * sample + 1] =
              static_cast<scalar_t>(a * corners.grad_y(dot) * static_cast<acc_t>(h));
        }
      }
    }
  }
}

// Deterministic value gradient, step 1: the value row (n, s, m) that each (sample, corner) touches,
// or kNoKey for corners outside the map. entry = sample * 4 + corner.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    corner_keys_kernel(const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                       const scalar_t* __restrict__ locations, int64_t* __restrict__ keys, Sizes sz,
                       int64_t entries) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < entries;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t sample = e / 4;
    const int64_t l = (sample / sz.points) % sz.levels;
    const int64_t item = sample / (sz.points * sz.levels);
    const int64_t m = item % sz.m;
    const int64_t n = item / (sz.lq * sz.m);
    const Corners<acc_t> corners(static_cast<acc_t>(locations[2 * sample]),
                                 static_cast<acc_t>(locations[2 * sample + 1]), shapes[2 * l],
                                 shapes[2 * l + 1]);
    const int64_t offset = corners.offset[e % 4];
    keys[e] = offset < 0 ? kNoKey : (n * sz.s + starts[l] + offset) * sz.m + m;
  }
}

// Deterministic value gradient, step 2: one group per run of equal sorted keys sums the run's
// contributions in sorted (stable, hence fixed) order and writes the value row once.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    gather_value_grad_kernel(const scalar_t* __restrict__ grad_output,
                             const int64_t* __restrict__ shapes,
                             const scalar_t* __restrict__ locations,
                             const scalar_t* __restrict__ weights,
                             const int64_t* __restrict__ sorted_keys,
                             const int64_t* __restrict__ order, scalar_t* __restrict__ grad_value,
                             Sizes sz, int64_t entries, int group_size) {
  using acc_t = at::opmath_type<scalar_t>;
  const Group group(group_size);
  for (int64_t i = group.first; i < entries; i += group.stride) {
    const int64_t key = sorted_keys[i];
    if (key == kNoKey || (i > 0 && sorted_keys[i - 1] == key)) continue;  // not a run's start
    for (int64_t c0 = int64_t(group.lane) * VEC; c0 < sz.d; c0 += int64_t(group.size) * VEC) {
      acc_t acc[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = acc_t(0);
      for (int64_t j = i; j < entries && sorted_keys[j] == key; ++j) {
        const int64_t e = order[j];
        const int64_t sample = e / 4;
        const int64_t l = (sample / sz.points) % sz.levels;
        const int64_t item = sample / (sz.points * sz.levels);
        const Corners<acc_t> corners(static_cast<acc_t>(locations[2 * sample]),
                                     static_cast<acc_t>(locations[2 * sample + 1]),
                                     shapes[2 * l], shapes[2 * l + 1]);
        const acc_t wc = static_cast<acc_t>(weights[sample]) * corners.weight[e % 4];
        const auto g = load_pack<scalar_t, VEC>(grad_output + item * sz.d + c0);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += wc * static_cast<acc_t>(g.v[k]);
      }
      Pack<scalar_t, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) out.v[k] = static_cast<scalar_t>(acc[k]);
      *reinterpret_cast<Pack<scalar_t, VEC>*>(grad_value + key * sz.d + c0) = out;
    }
  }
}

// Channels per lane: a 16-byte pack when D and every packed pointer allow it, else 1.
template <typename scalar_t>
int vector_width(int64_t d, std::initializer_list<const at::Tensor*> packed) {
  constexpr int wide = 16 / sizeof(scalar_t);
  if (d % wide != 0) return 1;
  for (const at::Tensor* t : packed) {
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return 1;
  }
  return wide;
}

// Calls f(std::integral_constant<int, VEC>) for the chosen vector width.
template <typename scalar_t, typename F>
void with_vector_width(int vec, F&& f) {
  constexpr int wide = 16 / sizeof(scalar_t);
  if (vec == wide) {
    f(std::integral_constant<int, wide>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Lanes per group: enough to cover D with one pack each, rounded up to a power of two, <= 32.
int group_size_for(int64_t d, int vec) {
  const int64_t packs = (d + vec - 1) / vec;
  int size = 1;
  while (size < packs && size < 32) size *= 2;
  return size;
}

int64_t blocks_for(int64_t work, int64_t per_block) {
  return std::max<int64_t>(1, std::min((work + per_block - 1) / per_block, kMaxBlocks));
}

struct Inputs {
  at::Tensor value, shapes, starts, locations, weights;
  Sizes sz;

  Inputs(const at::Tensor& value_, const at::Tensor& shapes_, const at::Tensor& starts_,
         const at::Tensor& locations_, const at::Tensor& weights_) {
    check_ms_deform_inputs(value_, shapes_, starts_, locations_, weights_);
    TORCH_CHECK(value_.is_cuda(), "ms_deform_sample CUDA kernel got a tensor on ", value_.device());
    value = value_.contiguous();
    shapes = shapes_.contiguous();
    starts = starts_.contiguous();
    locations = locations_.contiguous();
    weights = weights_.contiguous();
    sz = sizes_of(value, locations);
  }
};

}  // namespace

at::Tensor ms_deform_sample_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                    const at::Tensor& level_start_index,
                                    const at::Tensor& sampling_locations,
                                    const at::Tensor& attention_weights) {
  const Inputs in(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(in.value.device());
  auto output = at::empty({in.sz.n, in.sz.lq, in.sz.m * in.sz.d}, in.value.options());
  const int64_t items = in.sz.n * in.sz.lq * in.sz.m;
  if (items == 0 || in.sz.d == 0) return output.zero_();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_sample_forward_cuda", [&] {
        const int vec = vector_width<scalar_t>(in.sz.d, {&in.value, &output});
        const int group = group_size_for(in.sz.d, vec);
        with_vector_width<scalar_t>(vec, [&](auto width) {
          forward_kernel<scalar_t, decltype(width)::value>
              <<<blocks_for(items, kThreads / group), kThreads, 0, stream>>>(
                  in.value.data_ptr<scalar_t>(), in.shapes.data_ptr<int64_t>(),
                  in.starts.data_ptr<int64_t>(), in.locations.data_ptr<scalar_t>(),
                  in.weights.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), in.sz, group);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_sample_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, bool deterministic) {
  const Inputs in(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(in.value.device());
  const Sizes& sz = in.sz;
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({sz.n, sz.lq, sz.m * sz.d}),
              "ms_deform_sample backward: grad_output has shape ", grad_output.sizes(),
              ", expected ", at::IntArrayRef({sz.n, sz.lq, sz.m * sz.d}));
  const auto grad = grad_output.contiguous().to(in.value.scalar_type());
  auto grad_locations = at::zeros_like(in.locations);
  auto grad_weights = at::zeros_like(in.weights);
  const int64_t items = sz.n * sz.lq * sz.m;
  if (items == 0 || sz.d == 0 || sz.levels == 0 || sz.points == 0) {
    return {at::zeros_like(in.value), grad_locations, grad_weights};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad_value;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_sample_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        // Deterministic mode writes the value gradient in its own dtype, once per row; the
        // atomic path accumulates in acc_t and casts at the end.
        grad_value = deterministic ? at::zeros_like(in.value)
                                   : at::zeros(in.value.sizes(), in.value.options().dtype(
                                                                     c10::CppTypeToScalarType<acc_t>::value));
        const int vec = vector_width<scalar_t>(sz.d, {&in.value, &grad, &grad_value});
        const int group = group_size_for(sz.d, vec);
        const int64_t blocks = blocks_for(items, kThreads / group);
        with_vector_width<scalar_t>(vec, [&](auto width) {
          constexpr int VEC = decltype(width)::value;
          const auto launch = [&](auto scatter) {
            backward_kernel<scalar_t, VEC, decltype(scatter)::value>
                <<<blocks, kThreads, 0, stream>>>(
                    grad.data_ptr<scalar_t>(), in.value.data_ptr<scalar_t>(),
                    in.shapes.data_ptr<int64_t>(), in.starts.data_ptr<int64_t>(),
                    in.locations.data_ptr<scalar_t>(), in.weights.data_ptr<scalar_t>(),
                    deterministic ? nullptr : grad_value.data_ptr<acc_t>(),
                    grad_locations.data_ptr<scalar_t>(), grad_weights.data_ptr<scalar_t>(), sz,
                    group);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          };
          if (!deterministic) {
            launch(std::true_type{});
            return;
          }
          launch(std::false_type{});
          const int64_t entries = items * sz.levels * sz.points * 4;
          auto keys = at::empty({entries}, in.value.options().dtype(at::kLong));
          corner_keys_kernel<scalar_t><<<blocks_for(entries, kThreads), kThreads, 0, stream>>>(
              in.shapes.data_ptr<int64_t>(), in.starts.data_ptr<int64_t>(),
              in.locations.data_ptr<scalar_t>(), keys.data_ptr<int64_t>(), sz, entries);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          const auto [sorted_keys, order] = keys.sort(std::optional<bool>(true), /*dim=*/0);
          gather_value_grad_kernel<scalar_t, VEC>
              <<<blocks_for(entries, kThreads / group), kThreads, 0, stream>>>(
                  grad.data_ptr<scalar_t>(), in.shapes.data_ptr<int64_t>(),
                  in.locations.data_ptr<scalar_t>(), in.weights.data_ptr<scalar_t>(),
                  sorted_keys.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
                  grad_value.data_ptr<scalar_t>(), sz, entries, group);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return {grad_value.to(in.value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace weft
