// Interface between the torch binding (rnn_step_op.cpp) and the fused prefill kernels (prefill_kernels.cu).
// The prefill is the model's parallel forward over a prompt, run by the binding as a host loop over layers:
// these element-wise kernels, cuBLAS for the matrix products and the WKV forward kernel (wkv7.h).
// Plain pointers only, so the kernels compile with nvcc alone (no torch headers).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "rnn_step.h"

namespace prefill {

using rnn_step::DType;

// Mix slots of the time-mix lerp buffer [6, B*T, C]: r, k, v first, so one batched product makes all three.
enum Mix { MIX_R, MIX_K, MIX_V, MIX_W, MIX_A, MIX_G, NMIX };

// One LayerNorm + token shift per position of B rows of T tokens. x_out = x_in + dx (dx may be null; x_out may
// be null when dx is); y = LayerNorm(x_out) with (w, b); the previous position's y is recomputed from x_in + dx,
// before the first position it is prev[b] (ln output of the token before the prompt). Writes
// mix[m][s] = y + (y_prev - y) * vec[rows[m]] for m < nmix, and last[b] = y at the last position.
struct LnMix {
  const float* x_in = nullptr;
  const void* dx = nullptr;
  float* x_out = nullptr;
  const float* w = nullptr;
  const float* b = nullptr;
  const void* prev = nullptr;  // [B, C], model dtype
  void* last = nullptr;  // [B, C], model dtype; must not alias prev
  const float* vec = nullptr;  // this layer's [NVEC, C] table
  int rows[NMIX] = {};
  int nmix = 0;
  void* mix = nullptr;  // [nmix, B*T, C], model dtype
  int B = 0, T = 0, C = 0;
};
cudaError_t ln_mix(DType dt, const LnMix& a, cudaStream_t st);

// The dtype of the WKV inputs and outputs: the model's for bf16, fp32 for fp32 and fp16 models.
inline bool wkv_bf16(DType dt) { return dt == DType::BF16; }

// Per position and head: decay logit, in-context rate, value residual, kk normalisation, the k update and the
// bonus coefficient. rkv [3, B*T, C], wup/aup/vup [B*T, C] are the projections (model dtype; vup unused in
// layer 0, which writes vfirst instead of reading it). Writes the WKV inputs wkv_in [6, B*T, C] (wkv_bf16)
// (r, w, k, v, a = -kk, b = kk * rate) and bonus [B*T, H] = sum over the head of r * k * r_k.
struct Gates {
  const void *rkv = nullptr, *wup = nullptr, *aup = nullptr, *vup = nullptr;
  float* vfirst = nullptr;
  const float* vec = nullptr;
  void* wkv_in = nullptr;
  float* bonus = nullptr;
  int rows = 0, C = 0;
  bool first_layer = false;
};
cudaError_t gates(DType dt, const Gates& a, cudaStream_t st);

// out = (GroupNorm(y) + bonus * v) * g per position and head (y, v [B*T, C] in the WKV dtype; g, out model dtype).
cudaError_t out_norm(DType dt, const void* y, const float* bonus, const void* v, const void* g, const float* vec,
                     void* out, int rows, int C, cudaStream_t st);

// The LoRA down-projections' activations in place, hid [4, n] in the slot order v, w, a, g: tanh on w, sigmoid
// on g (model dtype).
cudaError_t lora_act(DType dt, void* hid, int64_t n, cudaStream_t st);

// x = relu(x)^2 in place (model dtype, n elements).
cudaError_t relu_sq(DType dt, void* x, int64_t n, cudaStream_t st);

// out[b] = LayerNorm(x[b, T-1] + dx[b, T-1]) with the final norm (glob rows LNO_W, LNO_B), fp32 [B, C].
cudaError_t last_ln(DType dt, const float* x, const void* dx, const float* glob, float* out, int B, int T, int C,
                    cudaStream_t st);

}  // namespace prefill
