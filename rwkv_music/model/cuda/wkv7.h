// Interface between the torch binding (wkv7_op.cpp) and the CUDA kernels (wkv7_kernels.cu).
// Plain pointers only, so the kernels compile with nvcc alone (no torch headers).
#pragma once
#include <cuda_runtime.h>

namespace wkv7 {

enum class DType { F32, BF16 };

// Tensors are contiguous: sequences [B, T, H, 64] (input dtype unless noted), states [B, H, 64, 64] fp32.
struct Args {
  int B = 0, T = 0, H = 0;
  const void *r = nullptr, *w = nullptr, *k = nullptr, *v = nullptr, *a = nullptr, *b = nullptr;
  const float* s0 = nullptr;  // initial state or nullptr (zeros)
  const unsigned char* starts = nullptr;  // [B, T] bool or nullptr: state reset to zero before marked steps
  void* y = nullptr;
  float* sT = nullptr;        // final state (written by forward, read by backward)
  float* sa = nullptr;        // [B, T, H, 64] fp32: S_{t-1} a_t (saved by forward when training)
  float* ckpt = nullptr;      // [B, H, ceil(T/L), 64, 64] fp32 state every L steps
  // backward
  const void* dy = nullptr;
  const float* dsT = nullptr;  // gradient of the final state or nullptr
  float* dsa = nullptr;        // [B, T, H, 64] fp32 scratch
  float* ds0 = nullptr;
  void *dr = nullptr, *dw = nullptr, *dk = nullptr, *dv = nullptr, *da = nullptr, *db = nullptr;
};

int chunk_len();
// Whether every launch configuration was compiled (-DWKV7_ALL_CONFIGS), or only the defaults.
bool all_configs();
cudaError_t forward(DType dt, int cfg, bool save, const Args& a, cudaStream_t st);
// cfg1: row config of backward pass 1, cfg2: column config of pass 2 (tables in wkv7_kernels.cu).
cudaError_t backward(DType dt, int cfg1, int cfg2, const Args& a, cudaStream_t st);
// One token: sequences are [B, H, 64] (T ignored); reads s0 (nullptr = zeros), writes y and sT.
cudaError_t step(DType dt, const Args& a, cudaStream_t st);

}  // namespace wkv7
