// Interface between the torch binding (wkv7_op.cpp) and the fused RNN-mode step (rnn_step_kernels.cu).
// Plain pointers only, so the kernels compile with nvcc alone (no torch headers).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace rnn_step {

enum class DType { F32, BF16, F16 };

// Rows of the per-layer fp32 vector table [L, NVEC, C] (`rwkv_music.model.fast_step` packs it in this order).
enum VecRow {
  LN1_W, LN1_B, LN2_W, LN2_B,
  X_R, X_W, X_K, X_V, X_A, X_G,  // time-mix lerps, in the order of the mix buffer
  W0, A0, V0, K_K, K_A, R_K, LNX_W, LNX_B,
  FFN_XK,
  NVEC
};
// Rows of the model-wide fp32 table [4, C].
enum GlobRow { LN0_W, LN0_B, LNO_W, LNO_B };

// Weights are in the model dtype and stacked over layers; matrices are [out, in] row-major.
//   proj  [L, P, C]  P = 3C + dw + da + dv + dg: receptance, key, value, then the LoRA down-projections
//                    w1^T, a1^T, v1^T, g1^T (layer 0's v1 rows are zeros and unused)
//   up    [L, R, C]  R = dw + da + dv + dg: the LoRA up-projections w2, a2, v2, g2
//   out   [L, C, C], ffn_k [L, F, C], ffn_v [L, C, F]
// State (updated in place): att_x, ffn_x [L, B, C] in the model dtype, wkv [L, B, H, 64, 64] fp32.
struct StepArgs {
  int B = 0, C = 0, H = 0, V = 0, F = 0, L = 0;
  int dw = 0, da = 0, dv = 0, dg = 0;
  const int64_t* tokens = nullptr;  // [B]
  const void *emb = nullptr, *head = nullptr;  // [V, C]
  const float* glob = nullptr;
  const float* vec = nullptr;
  const void *proj = nullptr, *up = nullptr, *out = nullptr, *ffn_k = nullptr, *ffn_v = nullptr;
  void* att_x = nullptr;
  float* wkv = nullptr;
  void* ffn_x = nullptr;
  float* work = nullptr;  // workspace_floats(B, C, F, P) floats
  float* logits = nullptr;  // [B, V] fp32
  bool tensor_cores = false;  // bf16 weights, sm_80+: the products on tensor cores (else on CUDA cores)
};

// x[s] = ln0(emb[tokens[s]]) (fp32 [rows, C]) for `rows` tokens; a token outside [0, V) gives a NaN row. The
// first kernel of the step, and of the prefill (prefill.h).
cudaError_t embed(DType dt, const int64_t* tokens, const void* emb, const float* glob, float* x, int rows, int C,
                  int V, cudaStream_t st);
int64_t workspace_floats(int64_t B, int64_t C, int64_t F, int64_t P);
cudaError_t step(DType dt, const StepArgs& a, cudaStream_t st);

}  // namespace rnn_step
