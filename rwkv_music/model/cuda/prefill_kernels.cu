// Element-wise kernels of the fused prefill (prefill.h): the model's parallel forward over a prompt.
//
// The readable forward issues ~60 kernels per layer at T tokens, so a 1024-token prompt at batch 1 is bound by
// launches (15 ms of CPU against 5.5 ms of GPU, docs/benchmarks.md). The binding (rnn_step_op.cpp) runs each
// layer as 13 launches: these kernels between cuBLAS products and the WKV forward kernel.
//   ln_mix    residual add + LayerNorm + token shift + the six (or one) lerps, one block per position
//   gates     decay logit, in-context rate, value residual, kk normalisation, k update, bonus: warp per head
//   out_norm  GroupNorm + bonus + output gate: warp per head
//   lora_act  tanh / sigmoid between the LoRA down- and up-projections (each direction one batched product)
//   relu_sq   the channel mix's relu^2
//   last_ln   the final LayerNorm of each row's last position (the only one whose logits a prompt needs)
// Products, lerps and the WKV inputs and outputs are in the model dtype, as the readable model runs them (fp32
// for fp16 models: the WKV kernels take bf16 or fp32); the residual stream, the WKV state and everything in
// between are fp32. The math is `rwkv_music/model/rwkv7.py`.

#include <type_traits>

#include "fused_util.cuh"
#include "prefill.h"

namespace prefill {
namespace {

using fused::from_f;
using fused::sigmoidf_;
using fused::to_f;
using fused::warp_sum;
using rnn_step::A0;
using rnn_step::K_A;
using rnn_step::K_K;
using rnn_step::LNO_B;
using rnn_step::LNO_W;
using rnn_step::LNX_B;
using rnn_step::LNX_W;
using rnn_step::R_K;
using rnn_step::V0;
using rnn_step::W0;

constexpr int N = 64;  // head size
constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr float LN_EPS = 1e-5f;  // nn.LayerNorm's default
constexpr float GN_EPS = 64e-5f;  // ln_x

// row[c] = x[c] + dx[c] for this block's columns; returns this thread's part of the row sum.
template <typename T>
__device__ __forceinline__ float load_row(float* row, const float* x, const T* dx, int C) {
  float sum = 0.f;
  for (int c = threadIdx.x; c < C; c += THREADS) {
    const float v = x[c] + (dx != nullptr ? to_f(dx[c]) : 0.f);
    row[c] = v;
    sum += v;
  }
  return sum;
}

template <typename T>
__device__ __forceinline__ float at_(const float* x, const T* dx, int c) {
  return x[c] + (dx != nullptr ? to_f(dx[c]) : 0.f);
}

constexpr int LN_THREADS = 128;

// The sums over a block of LN_THREADS of both parts of v; every thread gets them.
__device__ __forceinline__ float2 block_sum2(float2 v, float2* red) {
  v.x = warp_sum(v.x), v.y = warp_sum(v.y);
  const int w = threadIdx.x >> 5;
  __syncthreads();  // an earlier call may still be reading red
  if ((threadIdx.x & 31) == 0) red[w] = v;
  __syncthreads();
  float2 t = make_float2(0.f, 0.f);
#pragma unroll
  for (int i = 0; i < LN_THREADS / 32; ++i) t.x += red[i].x, t.y += red[i].y;
  return t;
}

// One block per position: the LayerNorms of its row and of the previous one (recomputed, so no block waits for
// another), both reduced at once (two block reductions in all, for the means and then the variances).
template <typename T>
__global__ void __launch_bounds__(LN_THREADS) ln_mix_k(LnMix a) {
  extern __shared__ float sm[];  // this row, the previous row
  __shared__ float2 red[LN_THREADS / 32];
  const int64_t s = blockIdx.x;
  const int C = a.C, b = (int)(s / a.T), t = (int)(s % a.T);
  const int64_t at = s * C, n_pos = (int64_t)a.B * a.T;
  const T* dx = static_cast<const T*>(a.dx);
  const T* dcur = dx == nullptr ? nullptr : dx + at;
  const T* dprv = dx == nullptr || t == 0 ? nullptr : dx + at - C;
  const float* xcur = a.x_in + at;
  const float* xprv = t > 0 ? xcur - C : xcur;
  float *cur = sm, *prv = sm + C;
  float2 sum = make_float2(0.f, 0.f);
  for (int c = threadIdx.x; c < C; c += LN_THREADS) {
    const float v = at_(xcur, dcur, c);
    cur[c] = v;
    sum.x += v;
    if (t > 0) {
      const float p = at_(xprv, dprv, c);
      prv[c] = p;
      sum.y += p;
    }
  }
  const float2 tot = block_sum2(sum, red);
  const float mean = tot.x / C, pmean = tot.y / C;
  float2 q = make_float2(0.f, 0.f);
  for (int c = threadIdx.x; c < C; c += LN_THREADS) {  // each thread reads back only the columns it wrote
    const float d = cur[c] - mean;
    q.x += d * d;
    if (t > 0) {
      const float e = prv[c] - pmean;
      q.y += e * e;
    }
  }
  q = block_sum2(q, red);
  const float rstd = rsqrtf(q.x / C + LN_EPS), prstd = rsqrtf(q.y / C + LN_EPS);
  const T* prev = static_cast<const T*>(a.prev) + (int64_t)b * C;
  T* mix = static_cast<T*>(a.mix);
  T* last = t == a.T - 1 ? static_cast<T*>(a.last) + (int64_t)b * C : nullptr;
  for (int c = threadIdx.x; c < C; c += LN_THREADS) {
    const float v = cur[c];
    if (a.x_out != nullptr) a.x_out[at + c] = v;
    const float y = (v - mean) * rstd * a.w[c] + a.b[c];
    const float p = t > 0 ? (prv[c] - pmean) * prstd * a.w[c] + a.b[c] : to_f(prev[c]);
    for (int m = 0; m < a.nmix; ++m) mix[m * n_pos * C + at + c] = from_f<T>(y + (p - y) * a.vec[a.rows[m] * C + c]);
    if (last != nullptr) last[c] = from_f<T>(y);
  }
}

// One warp per (position, head); lane l holds channels 2l and 2l + 1 of the head.
template <typename T, typename W>
__global__ void __launch_bounds__(THREADS) gates_k(Gates a) {
  const int H = a.C / N, C = a.C, lane = threadIdx.x & 31;
  const int64_t wid = (int64_t)blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (wid >= (int64_t)a.rows * H) return;
  const int64_t s = wid / H;
  const int h = (int)(wid % H);
  const int64_t RC = (int64_t)a.rows * C;
  const T *rkv = static_cast<const T*>(a.rkv), *wup = static_cast<const T*>(a.wup);
  const T *aup = static_cast<const T*>(a.aup), *vup = static_cast<const T*>(a.vup);
  const float* vec = a.vec;
  W* wkv_in = static_cast<W*>(a.wkv_in);
  float kk[2], rate[2], sq = 0.f, bonus = 0.f;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int c = h * N + 2 * lane + e;
    const int64_t i = s * C + c;
    const float r = to_f(rkv[i]);
    float k = to_f(rkv[RC + i]), v = to_f(rkv[2 * RC + i]);
    rate[e] = sigmoidf_(vec[A0 * C + c] + to_f(aup[i]));
    if (a.first_layer) {
      a.vfirst[i] = v;
    } else {
      v += (a.vfirst[i] - v) * sigmoidf_(vec[V0 * C + c] + to_f(vup[i]));
    }
    kk[e] = k * vec[K_K * C + c];
    sq += kk[e] * kk[e];
    k *= 1.f + (rate[e] - 1.f) * vec[K_A * C + c];
    bonus += r * k * vec[R_K * C + c];
    wkv_in[i] = from_f<W>(r);
    wkv_in[RC + i] = from_f<W>(vec[W0 * C + c] + to_f(wup[i]));  // the raw logit: the WKV kernel makes the decay
    wkv_in[2 * RC + i] = from_f<W>(k);
    wkv_in[3 * RC + i] = from_f<W>(v);
  }
  const float inv = 1.f / fmaxf(sqrtf(warp_sum(sq)), 1e-12f);  // F.normalize
  bonus = warp_sum(bonus);
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int64_t i = s * C + h * N + 2 * lane + e;
    const float kn = kk[e] * inv;
    wkv_in[4 * RC + i] = from_f<W>(-kn);
    wkv_in[5 * RC + i] = from_f<W>(kn * rate[e]);
  }
  if (lane == 0) a.bonus[s * H + h] = bonus;
}

template <typename T, typename W>
__global__ void __launch_bounds__(THREADS) out_norm_k(const W* __restrict__ y, const float* __restrict__ bonus,
                                                      const W* __restrict__ v, const T* __restrict__ g,
                                                      const float* __restrict__ vec, T* __restrict__ out, int rows,
                                                      int C) {
  const int H = C / N, lane = threadIdx.x & 31;
  const int64_t wid = (int64_t)blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (wid >= (int64_t)rows * H) return;
  const int64_t s = wid / H;
  const int h = (int)(wid % H), c0 = h * N + 2 * lane;
  const int64_t i0 = s * C + c0;
  const float y0 = to_f(y[i0]), y1 = to_f(y[i0 + 1]);
  const float mean = warp_sum(y0 + y1) / N;
  const float d0 = y0 - mean, d1 = y1 - mean;
  const float rstd = rsqrtf(warp_sum(d0 * d0 + d1 * d1) / N + GN_EPS);
  const float bo = bonus[s * H + h];
  const float o0 = d0 * rstd * vec[LNX_W * C + c0] + vec[LNX_B * C + c0] + bo * to_f(v[i0]);
  const float o1 = d1 * rstd * vec[LNX_W * C + c0 + 1] + vec[LNX_B * C + c0 + 1] + bo * to_f(v[i0 + 1]);
  out[i0] = from_f<T>(o0 * to_f(g[i0]));
  out[i0 + 1] = from_f<T>(o1 * to_f(g[i0 + 1]));
}

template <typename T>
__global__ void __launch_bounds__(THREADS) lora_act_k(T* __restrict__ hid, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * THREADS + threadIdx.x; i < 2 * n; i += (int64_t)gridDim.x * THREADS) {
    const int64_t at = i < n ? n + i : 3 * n + (i - n);  // slot 1 (w) then slot 3 (g)
    const float x = to_f(hid[at]);
    hid[at] = from_f<T>(i < n ? tanhf(x) : sigmoidf_(x));
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) relu_sq_k(T* __restrict__ x, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * THREADS + threadIdx.x; i < n; i += (int64_t)gridDim.x * THREADS) {
    const float t = fmaxf(to_f(x[i]), 0.f);
    x[i] = from_f<T>(t * t);
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) last_ln_k(const float* __restrict__ x, const T* __restrict__ dx,
                                                     const float* __restrict__ glob, float* __restrict__ out, int T_,
                                                     int C) {
  extern __shared__ float row[];
  __shared__ float red[WARPS];
  const int b = blockIdx.x;
  const int64_t at = ((int64_t)b * T_ + T_ - 1) * C;
  const float sum = load_row<T>(row, x + at, dx == nullptr ? nullptr : dx + at, C);
  fused::layer_norm_row<THREADS>(row, sum, glob + LNO_W * C, glob + LNO_B * C, C, red, LN_EPS);
  for (int c = threadIdx.x; c < C; c += THREADS) out[(int64_t)b * C + c] = row[c];
}

int warp_blocks(int64_t warps) { return (int)((warps + WARPS - 1) / WARPS); }

template <typename T>
cudaError_t ln_mix_t(const LnMix& a, cudaStream_t st) {
  const size_t smem = 2 * a.C * sizeof(float);
  if (smem > 48 * 1024) {  // past the default dynamic shared memory limit (n_embd > 6080)
    const cudaError_t e = cudaFuncSetAttribute(ln_mix_k<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  ln_mix_k<T><<<a.B * a.T, LN_THREADS, smem, st>>>(a);
  return cudaGetLastError();
}

// The WKV kernels' dtype for a model dtype (wkv_bf16 in prefill.h): bf16 stays bf16, the others run in fp32.
template <typename T>
using WkvOf = typename std::conditional<std::is_same<T, __nv_bfloat16>::value, __nv_bfloat16, float>::type;

template <typename T>
cudaError_t gates_t(const Gates& a, cudaStream_t st) {
  gates_k<T, WkvOf<T>><<<warp_blocks((int64_t)a.rows * (a.C / N)), THREADS, 0, st>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t out_norm_t(const void* y, const float* bonus, const void* v, const void* g, const float* vec, void* out,
                       int rows, int C, cudaStream_t st) {
  using W = WkvOf<T>;
  out_norm_k<T, W><<<warp_blocks((int64_t)rows * (C / N)), THREADS, 0, st>>>(
      static_cast<const W*>(y), bonus, static_cast<const W*>(v), static_cast<const T*>(g), vec, static_cast<T*>(out),
      rows, C);
  return cudaGetLastError();
}

int elementwise_blocks(int64_t n) {
  const int64_t blocks = (n + THREADS - 1) / THREADS;
  return (int)(blocks < 65536 ? blocks : 65536);
}

template <typename T>
cudaError_t lora_act_t(void* hid, int64_t n, cudaStream_t st) {
  lora_act_k<T><<<elementwise_blocks(2 * n), THREADS, 0, st>>>(static_cast<T*>(hid), n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t relu_sq_t(void* x, int64_t n, cudaStream_t st) {
  relu_sq_k<T><<<elementwise_blocks(n), THREADS, 0, st>>>(static_cast<T*>(x), n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t last_ln_t(const float* x, const void* dx, const float* glob, float* out, int B, int T_, int C,
                      cudaStream_t st) {
  last_ln_k<T><<<B, THREADS, C * sizeof(float), st>>>(x, static_cast<const T*>(dx), glob, out, T_, C);
  return cudaGetLastError();
}

}  // namespace

#define PREFILL_DISPATCH(fn, ...)                      \
  switch (dt) {                                        \
    case DType::F32:                                   \
      return fn<float>(__VA_ARGS__);                   \
    case DType::BF16:                                  \
      return fn<__nv_bfloat16>(__VA_ARGS__);           \
    case DType::F16:                                   \
      return fn<__half>(__VA_ARGS__);                  \
  }                                                    \
  return cudaErrorInvalidValue

cudaError_t ln_mix(DType dt, const LnMix& a, cudaStream_t st) { PREFILL_DISPATCH(ln_mix_t, a, st); }

cudaError_t gates(DType dt, const Gates& a, cudaStream_t st) { PREFILL_DISPATCH(gates_t, a, st); }

cudaError_t out_norm(DType dt, const void* y, const float* bonus, const void* v, const void* g, const float* vec,
                     void* out, int rows, int C, cudaStream_t st) {
  PREFILL_DISPATCH(out_norm_t, y, bonus, v, g, vec, out, rows, C, st);
}

cudaError_t lora_act(DType dt, void* hid, int64_t n, cudaStream_t st) { PREFILL_DISPATCH(lora_act_t, hid, n, st); }

cudaError_t relu_sq(DType dt, void* x, int64_t n, cudaStream_t st) { PREFILL_DISPATCH(relu_sq_t, x, n, st); }

cudaError_t last_ln(DType dt, const float* x, const void* dx, const float* glob, float* out, int B, int T, int C,
                    cudaStream_t st) {
  PREFILL_DISPATCH(last_ln_t, x, dx, glob, out, B, T, C, st);
}

#undef PREFILL_DISPATCH

}  // namespace prefill
