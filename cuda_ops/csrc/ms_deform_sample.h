// Multi-scale deformable sampling: the interface shared by the CPU and CUDA kernels.
//
// Shapes (Deformable-DETR convention):
//   value               (N, S, M, D)        S = sum over levels of H_l * W_l
//   spatial_shapes      (L, 2)   int64      (H_l, W_l)
//   level_start_index   (L,)     int64      offset of level l along S
//   sampling_locations  (N, Lq, M, L, P, 2) normalised (x, y); pixel = loc * size - 0.5
//   attention_weights   (N, Lq, M, L, P)
//   output              (N, Lq, M * D)
// value, sampling_locations and attention_weights share one floating dtype; accumulation is in
// at::opmath_type of it (float for half and bfloat16).
#pragma once

#include <torch/extension.h>

#include <tuple>

#include "bilinear.h"

namespace weft {

// Checks ranks, sizes, dtypes and devices; raises a message naming the offending argument.
void check_ms_deform_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index,
                            const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights);

// Sizes of a call whose inputs passed check_ms_deform_inputs.
Sizes sizes_of(const at::Tensor& value, const at::Tensor& sampling_locations);

// Implemented once per backend (cpu/ or cuda/); each extension links exactly one of them.
at::Tensor ms_deform_sample_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                    const at::Tensor& level_start_index,
                                    const at::Tensor& sampling_locations,
                                    const at::Tensor& attention_weights);

// Returns (grad_value, grad_sampling_locations, grad_attention_weights). With deterministic=true
// the value gradient is reduced in a fixed order (bitwise reproducible); the CPU kernel is always
// deterministic.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_sample_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, bool deterministic);

}  // namespace weft
