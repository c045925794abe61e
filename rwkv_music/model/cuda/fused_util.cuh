// Device helpers shared by the fused inference kernels (rnn_step_kernels.cu, prefill_kernels.cu): dtype
// conversion to and from fp32, 16-byte loads of eight weights, warp and block sums, a row LayerNorm.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace fused {

constexpr unsigned FULL = 0xffffffffu;

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + __expf(-x)); }

template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// Eight consecutive elements as fp32 (p 16-byte aligned), read through the read-only cache.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* o);
template <>
__device__ __forceinline__ void load8<float>(const float* p, float* o) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w, o[4] = b.x, o[5] = b.y, o[6] = b.z, o[7] = b.w;
}
template <>
__device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16* p, float* o) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    o[2 * i] = f.x, o[2 * i + 1] = f.y;
  }
}
template <>
__device__ __forceinline__ void load8<__half>(const __half* p, float* o) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    o[2 * i] = f.x, o[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
  return v;
}

// Sum over a block of THREADS threads; every thread gets the total. `red` is shared scratch of THREADS / 32
// floats.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* red) {
  constexpr int WARPS = THREADS / 32;
  v = warp_sum(v);
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
  __syncthreads();  // an earlier call may still be reading red
  if (l == 0) red[w] = v;
  __syncthreads();
  return warp_sum(l < WARPS ? red[l] : 0.f);
}

// LayerNorm of one row of C values (already in `row`, shared, each thread holding columns threadIdx.x +
// k * THREADS; `sum` is this thread's part of their sum) in place, two passes for the variance.
template <int THREADS>
__device__ __forceinline__ void layer_norm_row(float* row, float sum, const float* w, const float* b, int C,
                                               float* red, float eps = 1e-5f /* nn.LayerNorm's default */) {
  const float mean = block_sum<THREADS>(sum, red) / C;
  float q = 0.f;
  for (int c = threadIdx.x; c < C; c += THREADS) {
    const float d = row[c] - mean;
    q += d * d;
  }
  const float rstd = rsqrtf(block_sum<THREADS>(q, red) / C + eps);
  for (int c = threadIdx.x; c < C; c += THREADS) row[c] = (row[c] - mean) * rstd * w[c] + b[c];
}

}  // namespace fused
