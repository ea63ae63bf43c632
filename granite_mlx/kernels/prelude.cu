// CUDA prelude for the shared kernel bodies (*_body.h), passed as `header`
// to mx.fast.cuda_kernel. MLX's own default header comes first and already
// brings in cuda_fp16/cuda_bf16 (its generated signatures use __half and
// __nv_bfloat16). The lines between the gk-entry markers open the kernel body.

#define GK_SIMD 32
#define GK_SHARED(type, name, count) __shared__ type name[count]
#define GK_BARRIER() __syncthreads()
#define GK_SIMD_SUM(v) gk_simd_sum(v)

// Intrinsics rather than conversion operators: those vanish under
// __CUDA_NO_HALF_CONVERSIONS__.
__device__ __forceinline__ float gk_f(float v) { return v; }
__device__ __forceinline__ float gk_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float gk_f(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float gk_exp(float v) { return expf(v); }
__device__ __forceinline__ float gk_log1p(float v) { return log1pf(v); }
__device__ __forceinline__ float gk_fmin(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ float gk_fmax(float a, float b) { return fmaxf(a, b); }

// Butterfly over the warp: every lane ends with the full sum.
__device__ __forceinline__ float gk_simd_sum(float v) {
  for (int offset = GK_SIMD / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// gk-entry-begin
const int gk_tid = int(threadIdx.x);
const int gk_group_x = int(blockIdx.x);
const int gk_group_y = int(blockIdx.y);
const int gk_group_z = int(blockIdx.z);
// gk-entry-end
