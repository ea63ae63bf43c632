// Metal prelude for the shared kernel bodies (*_body.h), passed as `header`
// to mx.fast.metal_kernel; MLX has already included <metal_stdlib> and defined
// bfloat16_t. The lines between the gk-entry markers open the kernel body:
// MLX declares a thread attribute only when its name appears in the body
// source, so they must sit there rather than in this header.

#define GK_SIMD 32
#define GK_SHARED(type, name, count) threadgroup type name[count]
#define GK_BARRIER() metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup)
#define GK_SIMD_SUM(v) metal::simd_sum(v)

inline float gk_f(float v) { return v; }
inline float gk_f(half v) { return static_cast<float>(v); }
inline float gk_f(bfloat16_t v) { return static_cast<float>(v); }

// precise:: keeps IEEE results even where an MLX build compiles kernels with
// fast math.
inline float gk_exp(float v) { return metal::precise::exp(v); }
inline float gk_fmin(float a, float b) { return metal::fmin(a, b); }
inline float gk_fmax(float a, float b) { return metal::fmax(a, b); }

// Metal has no log1p; log(1 + v) corrected for the rounding of 1 + v.
inline float gk_log1p(float v) {
  const float u = 1.0f + v;
  return u == 1.0f ? v : metal::precise::log(u) * (v / (u - 1.0f));
}

// gk-entry-begin
const int gk_tid = int(thread_position_in_threadgroup.x);
const int gk_group_x = int(threadgroup_position_in_grid.x);
const int gk_group_y = int(threadgroup_position_in_grid.y);
const int gk_group_z = int(threadgroup_position_in_grid.z);
// gk-entry-end
