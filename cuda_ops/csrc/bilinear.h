// Bilinear corner arithmetic shared by the CPU and CUDA kernels (host and device code).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace weft {

// Sizes of one call; see ms_deform_sample.h for the layout of each tensor.
struct Sizes {
  int64_t n, s, m, d, lq, levels, points;
};

template <typename T>
C10_HOST_DEVICE inline T floor_of(T x) {
#ifdef __CUDA_ARCH__
  return floor(x);
#else
  return std::floor(x);
#endif
}

template <typename T>
C10_HOST_DEVICE inline bool is_finite(T x) {
#ifdef __CUDA_ARCH__
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// The four bilinear corners of one sample on one H x W level (align_corners=False, zero
// padding): corner c = (x0 + c % 2, y0 + c / 2). offset[c] is the corner's pixel index within the
// level (y * W + x) or -1 when it lies outside the map.
template <typename acc_t>
struct Corners {
  int64_t offset[4];
  acc_t weight[4];  // bilinear weight of each corner; they sum to 1
  acc_t fx, fy;     // position inside the cell, for the location gradient

  C10_HOST_DEVICE Corners(acc_t loc_x, acc_t loc_y, int64_t height, int64_t width) {
    const acc_t x = loc_x * static_cast<acc_t>(width) - acc_t(0.5);
    const acc_t y = loc_y * static_cast<acc_t>(height) - acc_t(0.5);
    const acc_t x0f = floor_of(x), y0f = floor_of(y);
    fx = x - x0f;
    fy = y - y0f;
    // Clamp before casting so far-away or non-finite locations cannot overflow int64; every
    // corner of a clamped point lies outside the map.
    const int64_t x0 = clamp_cell(x0f, width);
    const int64_t y0 = clamp_cell(y0f, height);
    weight[0] = (1 - fy) * (1 - fx);
    weight[1] = (1 - fy) * fx;
    weight[2] = fy * (1 - fx);
    weight[3] = fy * fx;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t xc = x0 + (c & 1), yc = y0 + (c >> 1);
      const bool inside = xc >= 0 && xc < width && yc >= 0 && yc < height;
      offset[c] = inside ? yc * width + xc : -1;
    }
  }

  // d(sum_c weight[c] * dot[c]) / d(x, y) in pixels, given dot[c] = <grad, value at corner c>.
  C10_HOST_DEVICE acc_t grad_x(const acc_t* dot) const {
    return (1 - fy) * (dot[1] - dot[0]) + fy * (dot[3] - dot[2]);
  }
  C10_HOST_DEVICE acc_t grad_y(const acc_t* dot) const {
    return (1 - fx) * (dot[2] - dot[0]) + fx * (dot[3] - dot[1]);
  }

 private:
  C10_HOST_DEVICE static int64_t clamp_cell(acc_t cell, int64_t size) {
    if (!is_finite(cell) || cell < acc_t(-2)) return -2;
    if (cell > static_cast<acc_t>(size)) return size;
    return static_cast<int64_t>(cell);
  }
};

}  // namespace weft
