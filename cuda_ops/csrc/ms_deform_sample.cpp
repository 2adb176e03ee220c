// Input validation and Python bindings shared by the CPU and CUDA extensions. The op's schema is
// declared in Python (cuda_ops/ops.py) so that it exists even where no extension could be built;
// these bindings only expose the kernels.
#include "ms_deform_sample.h"

namespace weft {

void check_ms_deform_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index,
                            const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_sample: value must be (N, S, M, D), got shape ",
              value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_sample: spatial_shapes must be (L, 2), got shape ", spatial_shapes.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_sample: sampling_locations must be (N, Lq, M, L, P, 2), got shape ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5,
              "ms_deform_sample: attention_weights must be (N, Lq, M, L, P), got shape ",
              attention_weights.sizes());
  const int64_t num_levels = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == num_levels,
              "ms_deform_sample: level_start_index must be (L,) with L = ", num_levels,
              ", got shape ", level_start_index.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong &&
                  level_start_index.scalar_type() == at::kLong,
              "ms_deform_sample: spatial_shapes and level_start_index must be int64, got ",
              spatial_shapes.scalar_type(), " and ", level_start_index.scalar_type());
  const auto n = value.size(0), m = value.size(2);
  TORCH_CHECK(sampling_locations.size(0) == n && sampling_locations.size(2) == m &&
                  sampling_locations.size(3) == num_levels,
              "ms_deform_sample: sampling_locations ", sampling_locations.sizes(),
              " does not match value ", value.sizes(), " and L = ", num_levels);
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_sample: attention_weights ", attention_weights.sizes(),
              " must equal sampling_locations.shape[:5] = ", sampling_locations.sizes().slice(0, 5));
  TORCH_CHECK(at::isFloatingType(value.scalar_type()),
              "ms_deform_sample: value must be floating point, got ", value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "ms_deform_sample: value, sampling_locations and attention_weights must share a "
              "dtype, got ",
              value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ",
              attention_weights.scalar_type());
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations,
                              &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(),
                "ms_deform_sample: all inputs must be on value's device ", value.device(),
                ", found one on ", t->device());
  }
}

Sizes sizes_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return {value.size(0),
          value.size(1),
          value.size(2),
          value.size(3),
          sampling_locations.size(1),
          sampling_locations.size(3),
          sampling_locations.size(4)};
}

}  // namespace weft

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &weft::ms_deform_sample_forward, "multi-scale deformable sampling (forward)");
  m.def("backward", &weft::ms_deform_sample_backward,
        "multi-scale deformable sampling (backward): grad_value, grad_locations, grad_weights");
}
