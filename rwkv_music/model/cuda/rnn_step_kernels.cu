// Fused RNN-mode step of the RWKV-7 model: one token for each of B sequences (decoding).
//
// At batch 1 a decode step is bound by kernel launches, not by the GPU: the readable step issues ~80 kernels
// per layer. This one issues seven, each doing the work of many:
//   ln_mix    LayerNorm + the six token-shift lerps (one block per sequence)
//   gemv      the seven projections that read the lerps (receptance, key, value, the four LoRA
//             down-projections) as one matrix-vector product over their concatenated rows, a row reading
//             the lerp it belongs to
//   wkv_head  per (sequence, head): the LoRA up-projections of the head's 64 channels, decay, in-context
//             rate, value residual, kk normalisation, the state update, GroupNorm, bonus and output gate
//   gemv      output projection, added to the residual stream
//   ln_mix    LayerNorm + the channel-mix lerp
//   gemv x2   channel-mix key (relu^2) and value (added to the residual stream)
// Weights are read in the model dtype; the residual stream and every intermediate are fp32, the WKV state too.
// For bf16 weights on sm_80 and later the products run on tensor cores (`gemv_mma`; StepArgs::tensor_cores), their
// inputs rounded to bf16 as the readable model's are: a sample's 16 candidates decode as 16 rows, and the CUDA-core
// gemv's time grows with the rows (at 16 rows on an H100 the step took 0.71 ms on tensor cores, 1.34 on CUDA cores).
// The math is `rwkv_music/model/rwkv7.py` (TimeMix, ChannelMix, Block) at T = 1.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "fused_util.cuh"
#include "rnn_step.h"

namespace rnn_step {
namespace {

constexpr int N = 64;  // head size
constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr float DECAY_SCALE = 0.60653065971263342f;  // exp(-0.5)
constexpr float LN_EPS = 1e-5f;  // nn.LayerNorm's default
constexpr float GN_EPS = 64e-5f;  // ln_x
using fused::FULL;

using fused::from_f;
using fused::load8;
using fused::sigmoidf_;
using fused::to_f;

__device__ __forceinline__ float block_sum(float v, float* red) { return fused::block_sum<THREADS>(v, red); }

__device__ __forceinline__ void layer_norm_row(float* row, float sum, const float* w, const float* b, int C,
                                               float* red) {
  fused::layer_norm_row<THREADS>(row, sum, w, b, C, red, LN_EPS);
}

// resid[b] = ln0(emb[tokens[b]]): layer 0's input. One block per sequence. A token outside [0, V) makes the
// row NaN (so its logits are NaN) instead of reading past the embedding.
template <typename T>
__global__ void __launch_bounds__(THREADS) embed_ln0(const int64_t* __restrict__ tokens, const T* __restrict__ emb,
                                                     const float* __restrict__ w, const float* __restrict__ b,
                                                     float* __restrict__ resid, int C, int V) {
  extern __shared__ float row[];
  __shared__ float red[WARPS];
  const int s = blockIdx.x;
  const int64_t tok = tokens[s];
  if (tok < 0 || tok >= V) {
    for (int c = threadIdx.x; c < C; c += THREADS) resid[(int64_t)s * C + c] = __int_as_float(0x7fc00000);
    return;
  }
  const T* e = emb + tok * (int64_t)C;
  float sum = 0.f;
  for (int c = threadIdx.x; c < C; c += THREADS) {
    row[c] = to_f(e[c]);
    sum += row[c];
  }
  layer_norm_row(row, sum, w, b, C, red);
  for (int c = threadIdx.x; c < C; c += THREADS) resid[(int64_t)s * C + c] = row[c];
}

// y = LayerNorm(resid[b]); out[m][b] = y + (prev[b] - y) * maa[m] for m < nmix (token shift), then prev[b] = y.
// prev == nullptr: out[0][b] = y (the final LayerNorm before the head). One block per sequence.
template <typename T>
__global__ void __launch_bounds__(THREADS) ln_mix(const float* __restrict__ resid, const float* __restrict__ w,
                                                  const float* __restrict__ bias, T* __restrict__ prev,
                                                  const float* __restrict__ maa, int nmix, float* __restrict__ out,
                                                  int B, int C) {
  extern __shared__ float row[];
  __shared__ float red[WARPS];
  const int s = blockIdx.x;
  float sum = 0.f;
  for (int c = threadIdx.x; c < C; c += THREADS) {
    row[c] = resid[(int64_t)s * C + c];
    sum += row[c];
  }
  layer_norm_row(row, sum, w, bias, C, red);
  for (int c = threadIdx.x; c < C; c += THREADS) {
    const int64_t at = (int64_t)s * C + c;
    const float y = row[c];
    if (prev == nullptr) {
      out[at] = y;
      continue;
    }
    const float p = to_f(prev[at]);
    for (int m = 0; m < nmix; ++m) out[(int64_t)m * B * C + at] = y + (p - y) * maa[m * C + c];
    prev[at] = from_f<T>(y);
  }
}

// Rows [end[i-1], end[i]) of a matrix read input vector in[i] (up to 8 segments). gemv_mma takes each segment in
// tiles of 16 rows; tiles[i] is the number of tiles up to and including segment i.
struct Segs {
  int n = 1;
  int end[8] = {};
  int in[8] = {};
  int tiles[8] = {};
};

enum Epilogue { STORE = 0, ADD = 1, RELU_SQ = 2 };

__device__ __forceinline__ void store_epilogue(float* y, float v, int epi) {
  if (epi == ADD) {
    *y += v;
  } else if (epi == RELU_SQ) {
    const float u = fmaxf(v, 0.f);
    *y = u * u;
  } else {
    *y = v;
  }
}

// Y[b, o] (op)= sum_k W[o, k] X_{seg(o)}[b, k] for P rows o and B sequences. One warp per row; BB sequences
// per pass over the row (weights are read once per pass, from L2 after the first). K % 8 == 0. A (row, sequence)
// gets the same bits at every B only because nvcc contracts the 8-product sum identically in every BB (its PTX, CUDA
// 13.0: one mul, seven fma, one add); tests/gpu/test_fast_step.py checks it.
template <typename T, int BB>
__global__ void __launch_bounds__(THREADS) gemv(const float* __restrict__ X, int64_t in_stride, Segs segs,
                                                const T* __restrict__ W, float* __restrict__ Y, int P, int K, int B,
                                                int epi) {
  const int lane = threadIdx.x & 31;
  const int o = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (o >= P) return;
  int sg = 0;
  while (sg + 1 < segs.n && o >= segs.end[sg]) ++sg;
  const float* x = X + segs.in[sg] * in_stride;
  const T* wr = W + (int64_t)o * K;
  for (int b0 = 0; b0 < B; b0 += BB) {
    float acc[BB];
#pragma unroll
    for (int j = 0; j < BB; ++j) acc[j] = 0.f;
#pragma unroll 4  // several 16-byte weight loads in flight: a row of 3072 is 12 of them per lane
    for (int k = lane * 8; k < K; k += 256) {
      float wv[8];
      load8(wr + k, wv);
#pragma unroll
      for (int j = 0; j < BB; ++j) {
        if (b0 + j < B) {
          const float4* xp = reinterpret_cast<const float4*>(x + (int64_t)(b0 + j) * K + k);
          const float4 x0 = xp[0], x1 = xp[1];
          acc[j] += wv[0] * x0.x + wv[1] * x0.y + wv[2] * x0.z + wv[3] * x0.w + wv[4] * x1.x + wv[5] * x1.y +
                    wv[6] * x1.z + wv[7] * x1.w;
        }
      }
    }
#pragma unroll
    for (int j = 0; j < BB; ++j) {
      float v = acc[j];
#pragma unroll
      for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(FULL, v, off);
      if (lane == 0 && b0 + j < B) store_epilogue(Y + (int64_t)(b0 + j) * P + o, v, epi);
    }
  }
}

constexpr int TILE = 16;  // output rows per gemv_mma block
constexpr int MMA_SEQS = 64;  // sequences per pass of gemv_mma over the weights (8 per tensor-core tile)

__device__ __forceinline__ uint32_t bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// d += a b: one m16n8k16 tensor-core product, bf16 inputs, fp32 accumulation.
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // never launched: below sm_80 the op keeps the products on the CUDA cores
#endif
}

// The output rows [o0, lim) of block blockIdx.x, in tiles of TILE within the segments, and the input they read.
struct RowTile {
  int o0, lim, in;
};
__device__ __forceinline__ RowTile row_tile(const Segs& segs) {
  int sg = 0;
  while (sg + 1 < segs.n && (int)blockIdx.x >= segs.tiles[sg]) ++sg;
  const int first = sg ? segs.end[sg - 1] : 0, tile0 = sg ? segs.tiles[sg - 1] : 0;
  return {first + ((int)blockIdx.x - tile0) * TILE, segs.end[sg], segs.in[sg]};
}

// After a pass of gemv_mma: each (row, sequence) of the block's tile is the sum of the warps' parts part[w][r][s],
// added in warp order, then stored through the epilogue.
template <int R, int S>
__device__ __forceinline__ void add_parts(const float (&part)[WARPS][R][S], int o0, int lim, int b0, int B, float* Y,
                                          int P, int epi) {
  __syncthreads();
  for (int e = threadIdx.x; e < R * S; e += THREADS) {
    const int r = e / S, col = e % S, o = o0 + r, s = b0 + col;
    if (o >= lim || s >= B) continue;
    float v = part[0][r][col];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) v += part[w][r][col];
    store_epilogue(Y + (int64_t)s * P + o, v, epi);
  }
  __syncthreads();  // part is written again by the next pass
}

// gemv for bf16 weights on tensor cores: Y[b, o] (op)= sum_k W[o, k] bf16(X_{seg(o)}[b, k]). A block takes 16
// rows of one segment; its 8 warps take the chunks of 32 columns in turn (warp w: chunks w, w + 8, ...), each
// chunk two m16n8k16 products per 8 sequences, then the warps' sums are added in warp order. The k order inside a
// product is permuted (lane group t holds columns 8t .. 8t + 7 of a chunk, so weights and inputs are 16- and
// 32-byte loads), the same permutation for both operands, so each product is still a dot product over its 16
// columns. A (row, sequence) gets the same bits at every B: a product's column depends only on its own sequence,
// and the order of the sums does not depend on B (tests/gpu/test_fast_step.py checks it). K % 8 == 0.
template <int NT>  // 8-sequence tiles per pass
__global__ void __launch_bounds__(THREADS) gemv_mma(const float* __restrict__ X, int64_t in_stride, Segs segs,
                                                    const __nv_bfloat16* __restrict__ W, float* __restrict__ Y, int P,
                                                    int K, int B, int epi) {
  __shared__ float part[WARPS][TILE][NT * 8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;  // the fragment's row (and sequence) group and column pair
  const RowTile tile = row_tile(segs);
  const int o0 = tile.o0, lim = tile.lim;
  const float* x = X + tile.in * in_stride;
  const bool row_lo = o0 + g < lim, row_hi = o0 + g + 8 < lim;
  const __nv_bfloat16* w_lo = W + (int64_t)(o0 + g) * K + 8 * t;
  const __nv_bfloat16* w_hi = w_lo + 8 * (int64_t)K;
  const int chunks = (K + 31) / 32;
  for (int b0 = 0; b0 < B; b0 += NT * 8) {
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll 4
    for (int c = warp; c < chunks; c += WARPS) {
      const int k = c * 32 + 8 * t;
      uint4 lo = make_uint4(0, 0, 0, 0), hi = lo;  // rows g and g + 8, columns k .. k + 7
      if (k < K) {
        if (row_lo) lo = __ldg(reinterpret_cast<const uint4*>(w_lo + c * 32));
        if (row_hi) hi = __ldg(reinterpret_cast<const uint4*>(w_hi + c * 32));
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int s = b0 + j * 8 + g;
        float4 x0 = make_float4(0.f, 0.f, 0.f, 0.f), x1 = x0;
        if (k < K && s < B) {
          const float4* xp = reinterpret_cast<const float4*>(x + (int64_t)s * K + k);
          x0 = xp[0], x1 = xp[1];
        }
        mma16816(acc[j], lo.x, hi.x, lo.y, hi.y, bf16x2(x0.x, x0.y), bf16x2(x0.z, x0.w));
        mma16816(acc[j], lo.z, hi.z, lo.w, hi.w, bf16x2(x1.x, x1.y), bf16x2(x1.z, x1.w));
      }
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {  // accumulator i: row g + 8 (i / 2), sequence j * 8 + 2 t + i % 2
      part[warp][g][j * 8 + 2 * t] = acc[j][0];
      part[warp][g][j * 8 + 2 * t + 1] = acc[j][1];
      part[warp][g + 8][j * 8 + 2 * t] = acc[j][2];
      part[warp][g + 8][j * 8 + 2 * t + 1] = acc[j][3];
    }
    add_parts(part, o0, lim, b0, B, Y, P, epi);
  }
}

struct HeadArgs {
  const float* proj = nullptr;  // [B, P]: r | k | v | w1 x | a1 x | v1 x | g1 x
  int P = 0, C = 0, H = 0, dw = 0, da = 0, dv = 0, dg = 0;
  const float* vec = nullptr;  // [NVEC, C] of this layer
  float* vfirst = nullptr;  // [B, C]: written by layer 0, read by the others
  float* state = nullptr;  // [B, H, N, N]
  float* out = nullptr;  // [B, C]: (GroupNorm(y) + bonus) * gate
  bool first_layer = false;
};

// Everything of one layer's time mix between the projections and the output projection, for one head of one
// sequence. Threads: LoRA ups in four groups of 64 (one channel each); the state update with four threads
// per state row (16 key columns each); per-channel work on threads 0..63.
template <typename T>
__global__ void __launch_bounds__(THREADS) wkv_head(HeadArgs a, const T* __restrict__ up) {
  extern __shared__ float lora[];  // dw + da + dv + dg: tanh(w1 x), a1 x, v1 x, sigmoid(g1 x)
  __shared__ float s_up[4][N], s_w[N], s_k[N], s_v[N], s_r[N], s_a[N], s_b[N], s_y[N];
  __shared__ float red[WARPS];
  const int h = blockIdx.x, s = blockIdx.y, tid = threadIdx.x;
  const int C = a.C;
  const float* pr = a.proj + (int64_t)s * a.P;
  const float* vec = a.vec;
  const int R = a.dw + a.da + a.dv + a.dg;
  for (int i = tid; i < R; i += THREADS) {
    float x = pr[3 * C + i];
    if (i < a.dw) x = tanhf(x);
    else if (i >= a.dw + a.da + a.dv) x = sigmoidf_(x);
    lora[i] = x;
  }
  __syncthreads();

  const int grp = tid >> 6, j = tid & (N - 1), c = h * N + j;
  {
    const int off = grp == 0 ? 0 : grp == 1 ? a.dw : grp == 2 ? a.dw + a.da : a.dw + a.da + a.dv;
    const int n = grp == 0 ? a.dw : grp == 1 ? a.da : grp == 2 ? (a.first_layer ? 0 : a.dv) : a.dg;
    float acc = 0.f;
#pragma unroll 8
    for (int i = 0; i < n; ++i) acc += lora[off + i] * to_f(up[(int64_t)(off + i) * C + c]);
    s_up[grp][j] = acc;
  }
  __syncthreads();

  float kk = 0.f, bonus_part = 0.f;
  if (tid < N) {
    const float r = pr[c];
    float k = pr[C + c], v = pr[2 * C + c];
    const float in_rate = sigmoidf_(vec[A0 * C + c] + s_up[1][j]);
    if (a.first_layer) {
      a.vfirst[(int64_t)s * C + c] = v;
    } else {
      v += (a.vfirst[(int64_t)s * C + c] - v) * sigmoidf_(vec[V0 * C + c] + s_up[2][j]);
    }
    kk = k * vec[K_K * C + c];
    k *= 1.f + (in_rate - 1.f) * vec[K_A * C + c];
    bonus_part = r * k * vec[R_K * C + c];
    s_w[j] = __expf(-DECAY_SCALE * sigmoidf_(vec[W0 * C + c] + s_up[0][j]));
    s_k[j] = k, s_v[j] = v, s_r[j] = r, s_b[j] = in_rate;
  }
  const float kk2 = block_sum(kk * kk, red);
  const float bonus = block_sum(bonus_part, red);
  if (tid < N) {
    const float kn = kk / fmaxf(sqrtf(kk2), 1e-12f);  // F.normalize
    s_a[j] = -kn;
    s_b[j] *= kn;
  }
  __syncthreads();

  // S = S diag(w) + (S a) b^T + v k^T;  y = S r.   Row i = value channel, columns = key channels.
  {
    const int i = tid >> 2, q = tid & 3, j0 = q * 16;
    float4* S = reinterpret_cast<float4*>(a.state + ((((int64_t)s * a.H + h) * N + i) * N + j0));
    float st[16];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float4 t = S[u];
      st[4 * u] = t.x, st[4 * u + 1] = t.y, st[4 * u + 2] = t.z, st[4 * u + 3] = t.w;
    }
    float sa = 0.f;
#pragma unroll
    for (int u = 0; u < 16; ++u) sa += st[u] * s_a[j0 + u];
    sa += __shfl_xor_sync(FULL, sa, 1);
    sa += __shfl_xor_sync(FULL, sa, 2);
    const float vi = s_v[i];
    float y = 0.f;
#pragma unroll
    for (int u = 0; u < 16; ++u) {
      st[u] = st[u] * s_w[j0 + u] + sa * s_b[j0 + u] + vi * s_k[j0 + u];
      y += st[u] * s_r[j0 + u];
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) S[u] = make_float4(st[4 * u], st[4 * u + 1], st[4 * u + 2], st[4 * u + 3]);
    y += __shfl_xor_sync(FULL, y, 1);
    y += __shfl_xor_sync(FULL, y, 2);
    if (q == 0) s_y[i] = y;
  }
  __syncthreads();

  const float yv = tid < N ? s_y[tid] : 0.f;
  const float mean = block_sum(yv, red) / N;
  const float d = tid < N ? yv - mean : 0.f;
  const float var = block_sum(d * d, red) / N;
  if (tid < N) {
    const float yn = d * rsqrtf(var + GN_EPS) * vec[LNX_W * C + c] + vec[LNX_B * C + c];
    a.out[(int64_t)s * C + c] = (yn + bonus * s_v[j]) * s_up[3][j];
  }
}

Segs one_segment(int rows) {
  Segs sg;
  sg.n = 1;
  sg.end[0] = rows;
  return sg;
}

void launch_gemv_mma(const float* X, int64_t in_stride, Segs sg, const __nv_bfloat16* W, float* Y, int P, int K,
                     int B, Epilogue epi, cudaStream_t st) {
  int tiles = 0;
  for (int i = 0; i < sg.n; ++i) {
    tiles += (sg.end[i] - (i ? sg.end[i - 1] : 0) + TILE - 1) / TILE;
    sg.tiles[i] = tiles;
  }
  if (B <= 8) {
    gemv_mma<1><<<tiles, THREADS, 0, st>>>(X, in_stride, sg, W, Y, P, K, B, epi);
  } else if (B <= 16) {
    gemv_mma<2><<<tiles, THREADS, 0, st>>>(X, in_stride, sg, W, Y, P, K, B, epi);
  } else if (B <= 32) {
    gemv_mma<4><<<tiles, THREADS, 0, st>>>(X, in_stride, sg, W, Y, P, K, B, epi);
  } else {
    gemv_mma<MMA_SEQS / 8><<<tiles, THREADS, 0, st>>>(X, in_stride, sg, W, Y, P, K, B, epi);
  }
}

// tensor_cores: gemv_mma, for bf16 weights only (fp16 keeps fp32 inputs: relu^2 of the channel mix can pass fp16's
// range); else the CUDA-core gemv.
template <typename T>
void launch_gemv(const float* X, int64_t in_stride, const Segs& sg, const T* W, float* Y, int P, int K, int B,
                 Epilogue epi, bool tensor_cores, cudaStream_t st) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if (tensor_cores) {
      launch_gemv_mma(X, in_stride, sg, W, Y, P, K, B, epi, st);
      return;
    }
  }
  const dim3 grid((P + WARPS - 1) / WARPS);
  if (B == 1) {
    gemv<T, 1><<<grid, THREADS, 0, st>>>(X, in_stride, sg, W, Y, P, K, B, epi);
  } else if (B == 2) {
    gemv<T, 2><<<grid, THREADS, 0, st>>>(X, in_stride, sg, W, Y, P, K, B, epi);
  } else if (B <= 4) {
    gemv<T, 4><<<grid, THREADS, 0, st>>>(X, in_stride, sg, W, Y, P, K, B, epi);
  } else {
    gemv<T, 8><<<grid, THREADS, 0, st>>>(X, in_stride, sg, W, Y, P, K, B, epi);
  }
}

// The projections' buffer, rounded up to 8 floats: the buffers after it are read with 16-byte loads (`gemv`),
// and B * P is a multiple of 4 only when the LoRA ranks add up to one.
int64_t proj_floats(int64_t B, int64_t P) { return (B * P + 7) / 8 * 8; }

template <typename T>
cudaError_t step_t(const StepArgs& a, cudaStream_t st) {
  const int B = a.B, C = a.C, F = a.F, H = a.H;
  const int R = a.dw + a.da + a.dv + a.dg, P = 3 * C + R;
  const int64_t BC = (int64_t)B * C;
  float* mix = a.work;  // [6, B, C]: the lerps r, w, k, v, a, g (channel mix: slot 0)
  float* proj = mix + 6 * BC;  // [B, P]
  float* resid = proj + proj_floats(B, P);  // [B, C]
  float* vfirst = resid + BC;  // [B, C]
  float* att = vfirst + BC;  // [B, C]
  float* hid = att + BC;  // [B, F]
  const size_t row_smem = C * sizeof(float);

  // Rows of `proj` and the lerp each reads (mix slots: 0 r, 1 w, 2 k, 3 v, 4 a, 5 g).
  Segs seg7;
  seg7.n = 7;
  const int ends[7] = {C, 2 * C, 3 * C, 3 * C + a.dw, 3 * C + a.dw + a.da, 3 * C + a.dw + a.da + a.dv, P};
  const int ins[7] = {0, 2, 3, 1, 4, 3, 5};
  for (int i = 0; i < 7; ++i) seg7.end[i] = ends[i], seg7.in[i] = ins[i];

  embed_ln0<T><<<B, THREADS, row_smem, st>>>(a.tokens, static_cast<const T*>(a.emb), a.glob + LN0_W * C,
                                             a.glob + LN0_B * C, resid, C, a.V);
  for (int l = 0; l < a.L; ++l) {
    const float* vec = a.vec + (int64_t)l * NVEC * C;
    T* att_x = static_cast<T*>(a.att_x) + l * BC;
    T* ffn_x = static_cast<T*>(a.ffn_x) + l * BC;
    const T* proj_w = static_cast<const T*>(a.proj) + (int64_t)l * P * C;
    const T* up_w = static_cast<const T*>(a.up) + (int64_t)l * R * C;
    const T* out_w = static_cast<const T*>(a.out) + (int64_t)l * C * C;
    const T* key_w = static_cast<const T*>(a.ffn_k) + (int64_t)l * F * C;
    const T* val_w = static_cast<const T*>(a.ffn_v) + (int64_t)l * C * F;

    ln_mix<T><<<B, THREADS, row_smem, st>>>(resid, vec + LN1_W * C, vec + LN1_B * C, att_x, vec + X_R * C, 6,
                                            mix, B, C);
    launch_gemv<T>(mix, BC, seg7, proj_w, proj, P, C, B, STORE, a.tensor_cores, st);
    HeadArgs h;
    h.proj = proj, h.P = P, h.C = C, h.H = H, h.dw = a.dw, h.da = a.da, h.dv = a.dv, h.dg = a.dg;
    h.vec = vec, h.vfirst = vfirst, h.state = a.wkv + (int64_t)l * B * H * N * N, h.out = att;
    h.first_layer = l == 0;
    wkv_head<T><<<dim3(H, B), THREADS, R * sizeof(float), st>>>(h, up_w);
    launch_gemv<T>(att, 0, one_segment(C), out_w, resid, C, C, B, ADD, a.tensor_cores, st);
    ln_mix<T><<<B, THREADS, row_smem, st>>>(resid, vec + LN2_W * C, vec + LN2_B * C, ffn_x, vec + FFN_XK * C, 1,
                                            mix, B, C);
    launch_gemv<T>(mix, 0, one_segment(F), key_w, hid, F, C, B, RELU_SQ, a.tensor_cores, st);
    launch_gemv<T>(hid, 0, one_segment(C), val_w, resid, C, F, B, ADD, a.tensor_cores, st);
  }
  ln_mix<T><<<B, THREADS, row_smem, st>>>(resid, a.glob + LNO_W * C, a.glob + LNO_B * C, static_cast<T*>(nullptr),
                                          nullptr, 1, mix, B, C);
  launch_gemv<T>(mix, 0, one_segment(a.V), static_cast<const T*>(a.head), a.logits, a.V, C, B, STORE, a.tensor_cores, st);
  return cudaGetLastError();
}

template <typename T>
cudaError_t embed_t(const int64_t* tokens, const void* emb, const float* glob, float* x, int rows, int C, int V,
                    cudaStream_t st) {
  embed_ln0<T><<<rows, THREADS, C * sizeof(float), st>>>(tokens, static_cast<const T*>(emb), glob + LN0_W * C,
                                                        glob + LN0_B * C, x, C, V);
  return cudaGetLastError();
}

}  // namespace

cudaError_t embed(DType dt, const int64_t* tokens, const void* emb, const float* glob, float* x, int rows, int C,
                  int V, cudaStream_t st) {
  switch (dt) {
    case DType::F32:
      return embed_t<float>(tokens, emb, glob, x, rows, C, V, st);
    case DType::BF16:
      return embed_t<__nv_bfloat16>(tokens, emb, glob, x, rows, C, V, st);
    case DType::F16:
      return embed_t<__half>(tokens, emb, glob, x, rows, C, V, st);
  }
  return cudaErrorInvalidValue;
}

int64_t workspace_floats(int64_t B, int64_t C, int64_t F, int64_t P) { return B * (9 * C + F) + proj_floats(B, P); }

cudaError_t step(DType dt, const StepArgs& a, cudaStream_t st) {
  switch (dt) {
    case DType::F32:
      return step_t<float>(a, st);
    case DType::BF16:
      return step_t<__nv_bfloat16>(a, st);
    case DType::F16:
      return step_t<__half>(a, st);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rnn_step
