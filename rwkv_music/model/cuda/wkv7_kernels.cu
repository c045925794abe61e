// RWKV-7 WKV kernels: forward, backward (two passes) and a single-token step.
//
// Per head (N = 64), state S [N, N] with rows i = value index and columns j = key index:
//     S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,    y_t = S_t r_t,
//     d_t = exp(-exp(-0.5) * sigmoid(w_t))     (w is the raw logit; d lies in [0.545, 1)).
//
// The recurrence couples only the entries of one row (forward) or treats rows as independent given
// sa_t = S_{t-1} a_t, so every kernel splits a head's 64x64 state over several blocks:
//   fwd   rows split over blocks; each thread holds R rows x (64/P) columns, the row sums (sa, y) are
//         finished with P-lane shuffles.  Saves sa_t (fp32) and the state every L steps when training.
//   bwd1  the same layout, backwards in time, for dS alone: dS_t = dS_{t+1} D + dsa a^T, + dy r^T.
//         dS needs no S.  Gives dv = dS k, dsa = dS b (saved, fp32) and the initial state's gradient.
//   bwd2  columns split over blocks; each thread holds 64/RG rows x Cc columns of S and dS.  Given sa
//         and dsa, columns are independent: S steps backwards from the nearest checkpoint by inverting
//         the update (d >= 0.545, at most L steps), dS by its recurrence; the column sums dr, dk, db,
//         da and the decay gradient are finished with RG-lane shuffles.
// Inputs are staged chunk by chunk (L steps) into shared memory as fp32, the next chunk's global loads
// in flight while the current one is computed.  Steps past T are padded with d = 1 and zeros, which
// leave S and dS unchanged.
// Packed rows: `starts` marks steps where the state restarts from zero (several sequences in one row).
// fwd zeroes S before such a step (the checkpoint of a chunk is taken before its first step, so it holds
// the state before the reset), bwd1 zeroes dS after it, and bwd2, whose backward steps cannot invert a
// reset, replays the chunk from its checkpoint up to the step before the reset (columns stay independent
// given the saved sa, so the replay is exact and local to the block).
//
// Only the launch configurations `default_config` picks are compiled; -DWKV7_ALL_CONFIGS adds the rest
// for benchmark sweeps.

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "wkv7.h"

namespace wkv7 {
namespace {

constexpr int N = 64;
constexpr int L = 16;  // chunk length = checkpoint interval
constexpr float DECAY_SCALE = 0.60653065971263342f;  // exp(-0.5)
constexpr unsigned FULL = 0xffffffffu;

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + __expf(-x)); }

// ---- 16-byte vector IO for fp32 and bf16 ------------------------------------------------------------
template <typename F>
struct IO;

template <>
struct IO<float> {
  static constexpr int V = 4;
  __device__ static void unpack(const uint4& u, float* o) {
    o[0] = __uint_as_float(u.x);
    o[1] = __uint_as_float(u.y);
    o[2] = __uint_as_float(u.z);
    o[3] = __uint_as_float(u.w);
  }
  __device__ static uint4 pack(const float* o) {
    return make_uint4(__float_as_uint(o[0]), __float_as_uint(o[1]), __float_as_uint(o[2]),
                      __float_as_uint(o[3]));
  }
  __device__ static float to_f(float x) { return x; }
  __device__ static float from_f(float x) { return x; }
};

template <>
struct IO<__nv_bfloat16> {
  static constexpr int V = 8;
  __device__ static void unpack2(uint32_t x, float* o) {
    o[0] = __uint_as_float(x << 16);
    o[1] = __uint_as_float(x & 0xffff0000u);
  }
  __device__ static void unpack(const uint4& u, float* o) {
    unpack2(u.x, o);
    unpack2(u.y, o + 2);
    unpack2(u.z, o + 4);
    unpack2(u.w, o + 6);
  }
  __device__ static uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static uint4 pack(const float* o) {
    return make_uint4(pack2(o[0], o[1]), pack2(o[2], o[3]), pack2(o[4], o[5]), pack2(o[6], o[7]));
  }
  __device__ static float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
};

// How a staged value is transformed on its way into shared memory (padded steps get `pad`).
enum class Tf { Plain, Decay, Sigmoid };

template <Tf TF>
__device__ __forceinline__ float transform(float x, bool valid) {
  if constexpr (TF == Tf::Plain) {
    return valid ? x : 0.f;
  } else if constexpr (TF == Tf::Decay) {
    return valid ? __expf(-DECAY_SCALE * sigmoidf_(x)) : 1.f;
  } else {  // sigmoid(w); padded steps get 0, i.e. decay 1 and no decay gradient
    return valid ? sigmoidf_(x) : 0.f;
  }
}

// One chunk (L steps) of W consecutive channels starting at `off` of a [B, T, H, N] tensor, held in
// registers between `load` (global) and `store` (shared memory, fp32, transformed).
template <typename F, int NT, int W>
struct Chunk {
  static constexpr int V = IO<F>::V;
  static_assert(W % V == 0, "width must be a multiple of the vector size");
  static constexpr int PER_STEP = W / V;
  static constexpr int TOTAL = L * PER_STEP;
  static constexpr int PER_THREAD = (TOTAL + NT - 1) / NT;
  uint4 reg[PER_THREAD];

  // base points at element (b, t=0, h, off); stride_t = H * N.
  __device__ __forceinline__ void load(const F* __restrict__ base, long stride_t, int t0, int T) {
#pragma unroll
    for (int u = 0; u < PER_THREAD; ++u) {
      const int idx = threadIdx.x + u * NT;
      reg[u] = make_uint4(0u, 0u, 0u, 0u);
      if (idx < TOTAL) {
        const int s = idx / PER_STEP, q = idx % PER_STEP;
        if (t0 + s < T) reg[u] = __ldg(reinterpret_cast<const uint4*>(base + (long)(t0 + s) * stride_t + q * V));
      }
    }
  }
  template <Tf TF>
  __device__ __forceinline__ void store(float* dst /* [L][W] */, int t0, int T) const {
#pragma unroll
    for (int u = 0; u < PER_THREAD; ++u) {
      const int idx = threadIdx.x + u * NT;
      if (idx < TOTAL) {
        const int s = idx / PER_STEP, q = idx % PER_STEP;
        const bool valid = t0 + s < T;
        float tmp[V];
        IO<F>::unpack(reg[u], tmp);
        float* d = dst + s * W + q * V;
#pragma unroll
        for (int e = 0; e < V; ++e) d[e] = transform<TF>(tmp[e], valid);
      }
    }
  }
};

struct NoPost {
  __device__ float operator()(int, int, float x) const { return x; }
};

// Write a [L][W] fp32 shared-memory tile (the sum of NSUM tiles `part_stride` floats apart) to steps t0..
// of a [B, T, H, N] tensor, channels off..off+W; post(s, channel, value) transforms each value.
template <typename F, int NT, int W, int NSUM = 1, class Post = NoPost>
__device__ __forceinline__ void write_chunk(F* __restrict__ base, long stride_t, int t0, int T,
                                            const float* src, int part_stride = 0, Post post = Post()) {
  constexpr int V = IO<F>::V;
  constexpr int PER_STEP = W / V;
  for (int idx = threadIdx.x; idx < L * PER_STEP; idx += NT) {
    const int s = idx / PER_STEP, q = idx % PER_STEP;
    if (t0 + s < T) {
      float tmp[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        float x = 0.f;
#pragma unroll
        for (int u = 0; u < NSUM; ++u) x += src[u * part_stride + s * W + q * V + e];
        tmp[e] = post(s, q * V + e, x);
      }
      *reinterpret_cast<uint4*>(base + (long)(t0 + s) * stride_t + q * V) = IO<F>::pack(tmp);
    }
  }
}

// Reset flags of steps t0 .. t0+L-1 into shared memory (0 past T or without starts).
// Returns this thread's flag (0 for threads >= L), for the chunk's __syncthreads_or.
__device__ __forceinline__ int stage_starts(int* dst, const unsigned char* __restrict__ starts, int b, int T,
                                            int t0) {
  int f = 0;
  if (threadIdx.x < L) {
    const int t = t0 + threadIdx.x;
    f = (starts != nullptr && t < T) ? (int)starts[(long)b * T + t] : 0;
    dst[threadIdx.x] = f;
  }
  return f;
}

// A compile-time flag for the step loops, written once as generic lambdas: chunks without a reset (most of a
// packed row: windows are ~137 steps, chunks 16) run the loop with no reset code.
template <bool B>
struct Flag {
  static constexpr bool value = B;
};

template <int P>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int o = 1; o < P; o <<= 1) x += __shfl_xor_sync(FULL, x, o);
  return x;
}

// ---- staging shared by the two row kernels (forward, backward pass 1) ---------------------------------------
// Their inputs for one chunk: r, w (as the decay), k, a, b over all 64 columns, and one input per row (v in
// the forward, dy in backward pass 1) over the block's RB rows.
template <int RB>
struct RowTiles {
  float r[L][N], w[L][N], k[L][N], a[L][N], b[L][N], row[L][RB];
};

template <typename F, int NT, int RB>
struct RowStage {
  Chunk<F, NT, N> r, w, k, a, b;
  Chunk<F, NT, RB> row;
  const F *r_, *w_, *k_, *a_, *b_, *row_;  // element (b, t=0, h, 0); row_ at the block's first row
  long stride_t;
  int T;

  __device__ __forceinline__ void load(int t0) {
    r.load(r_, stride_t, t0, T);
    w.load(w_, stride_t, t0, T);
    k.load(k_, stride_t, t0, T);
    a.load(a_, stride_t, t0, T);
    b.load(b_, stride_t, t0, T);
    row.load(row_, stride_t, t0, T);
  }
  __device__ __forceinline__ void store(RowTiles<RB>& sh, int t0) const {
    r.template store<Tf::Plain>(&sh.r[0][0], t0, T);
    w.template store<Tf::Decay>(&sh.w[0][0], t0, T);
    k.template store<Tf::Plain>(&sh.k[0][0], t0, T);
    a.template store<Tf::Plain>(&sh.a[0][0], t0, T);
    b.template store<Tf::Plain>(&sh.b[0][0], t0, T);
    row.template store<Tf::Plain>(&sh.row[0][0], t0, T);
  }
};

// A row kernel thread's part of a [64, 64] state (rows row0 + g + NG*rr, columns 4p + 4P*m + q), from
// `src` (zeros when null), or back to `dst`.
template <int R, int M, int P, int NG>
__device__ __forceinline__ void load_rows(const float* src, float (&X)[R][4 * M], int row0, int g, int p) {
#pragma unroll
  for (int rr = 0; rr < R; ++rr)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
      if (src != nullptr) x = *reinterpret_cast<const float4*>(src + (row0 + g + NG * rr) * N + 4 * p + 4 * P * m);
      X[rr][4 * m] = x.x, X[rr][4 * m + 1] = x.y, X[rr][4 * m + 2] = x.z, X[rr][4 * m + 3] = x.w;
    }
}

template <int R, int M, int P, int NG>
__device__ __forceinline__ void store_rows(float* dst, const float (&X)[R][4 * M], int row0, int g, int p) {
#pragma unroll
  for (int rr = 0; rr < R; ++rr)
#pragma unroll
    for (int m = 0; m < M; ++m)
      *reinterpret_cast<float4*>(dst + (row0 + g + NG * rr) * N + 4 * p + 4 * P * m) =
          make_float4(X[rr][4 * m], X[rr][4 * m + 1], X[rr][4 * m + 2], X[rr][4 * m + 3]);
}

// ---- forward ------------------------------------------------------------------------------------------
// Block: RB rows of one head.  Thread (g, p): rows row0 + g + NG*r (r < R), columns 4p + 4P*m + q.
// DEFER: y's row sums are not finished with shuffles each step; each thread leaves its partial sum in
// shared memory and the P partials are added when the chunk is written (shorter per-step dependency chain).
// s0 and sT may be the same buffer (the fused prefill updates the state in place): load_rows and store_rows use
// the same addresses, each thread reads its elements before the time loop and writes them once after it.
template <typename F, int RB, int R, int P, int U, bool DEFER, bool SAVE, bool RS>
__global__ void __launch_bounds__(RB / R * P) fwd_kernel(
    int T, int H, const F* __restrict__ r_, const F* __restrict__ w_, const F* __restrict__ k_,
    const F* __restrict__ v_, const F* __restrict__ a_, const F* __restrict__ b_,
    const float* __restrict__ s0, const unsigned char* __restrict__ starts, F* __restrict__ y_,
    float* __restrict__ sT, float* __restrict__ sa_out, float* __restrict__ ckpt) {
  constexpr int NG = RB / R, NT = NG * P, C = N / P, M = C / 4;
  static_assert(NT % 32 == 0 && C % 4 == 0 && P <= 16, "bad fwd config");
  const int p = threadIdx.x % P, g = threadIdx.x / P;
  const int row0 = blockIdx.x * RB, h = blockIdx.y, b = blockIdx.z;
  const long stride_t = (long)H * N;
  const long in0 = ((long)b * T * H + h) * N;  // element (b, 0, h, 0)
  const long head = (long)b * H + h;
  const int NC = (T + L - 1) / L;

  __shared__ __align__(16) RowTiles<RB> sh;
  __shared__ __align__(16) float o_y[DEFER ? P : 1][L][RB], o_sa[L][RB];
  __shared__ int s_st[L];
  const auto &s_r = sh.r, &s_w = sh.w, &s_k = sh.k, &s_a = sh.a, &s_b = sh.b;
  const auto& s_v = sh.row;

  float S[R][C];
  load_rows<R, M, P, NG>(s0 == nullptr ? nullptr : s0 + head * N * N, S, row0, g, p);

  RowStage<F, NT, RB> stage{{}, {}, {}, {}, {}, {}, r_ + in0, w_ + in0, k_ + in0, a_ + in0, b_ + in0,
                            v_ + in0 + row0, stride_t, T};
  stage.load(0);

  for (int c = 0; c < NC; ++c) {
    const int t0 = c * L;
    __syncthreads();
    stage.store(sh, t0);
    const int my_start = RS ? stage_starts(s_st, starts, b, T, t0) : 0;
    if (c + 1 < NC) stage.load(t0 + L);
    if constexpr (SAVE) {
      if (c > 0) {  // checkpoint c = state after c*L steps
        float* dst = ckpt + ((head * NC + c) * N + row0) * N;
#pragma unroll
        for (int rr = 0; rr < R; ++rr)
#pragma unroll
          for (int m = 0; m < M; ++m)
            *reinterpret_cast<float4*>(dst + (g + NG * rr) * N + 4 * p + 4 * P * m) =
                make_float4(S[rr][4 * m], S[rr][4 * m + 1], S[rr][4 * m + 2], S[rr][4 * m + 3]);
      }
    }
    const bool chunk_reset = RS ? __syncthreads_or(my_start) != 0 : (__syncthreads(), false);

    auto steps = [&](auto rs_flag) {
      constexpr bool RST = decltype(rs_flag)::value;
#pragma unroll U
      for (int s = 0; s < L; ++s) {
        if (RST && s_st[s]) {
#pragma unroll
          for (int rr = 0; rr < R; ++rr)
#pragma unroll
            for (int jj = 0; jj < C; ++jj) S[rr][jj] = 0.f;
        }
        float av[C];
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const float4 x = *reinterpret_cast<const float4*>(&s_a[s][4 * p + 4 * P * m]);
          av[4 * m] = x.x, av[4 * m + 1] = x.y, av[4 * m + 2] = x.z, av[4 * m + 3] = x.w;
        }
        float sa[R];
#pragma unroll
        for (int rr = 0; rr < R; ++rr) {
          float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int jj = 0; jj < C; ++jj) acc[jj % 4] = fmaf(S[rr][jj], av[jj], acc[jj % 4]);
          sa[rr] = group_sum<P>((acc[0] + acc[1]) + (acc[2] + acc[3]));
        }
        float y[R];
        float vv[R];
#pragma unroll
        for (int rr = 0; rr < R; ++rr) {
          vv[rr] = s_v[s][g + NG * rr];
          y[rr] = 0.f;
        }
        float yacc[R][2];
#pragma unroll
        for (int rr = 0; rr < R; ++rr) yacc[rr][0] = yacc[rr][1] = 0.f;
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const int col = 4 * p + 4 * P * m;
          const float4 wq = *reinterpret_cast<const float4*>(&s_w[s][col]);
          const float4 kq = *reinterpret_cast<const float4*>(&s_k[s][col]);
          const float4 bq = *reinterpret_cast<const float4*>(&s_b[s][col]);
          const float4 rq = *reinterpret_cast<const float4*>(&s_r[s][col]);
          const float wv[4] = {wq.x, wq.y, wq.z, wq.w}, kv[4] = {kq.x, kq.y, kq.z, kq.w};
          const float bv[4] = {bq.x, bq.y, bq.z, bq.w}, rv[4] = {rq.x, rq.y, rq.z, rq.w};
#pragma unroll
          for (int rr = 0; rr < R; ++rr)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              float& x = S[rr][4 * m + q];
              x = fmaf(x, wv[q], fmaf(sa[rr], bv[q], vv[rr] * kv[q]));
              yacc[rr][q & 1] = fmaf(x, rv[q], yacc[rr][q & 1]);
            }
        }
        if constexpr (DEFER) {
#pragma unroll
          for (int rr = 0; rr < R; ++rr) o_y[p][s][g + NG * rr] = yacc[rr][0] + yacc[rr][1];
        } else {
#pragma unroll
          for (int rr = 0; rr < R; ++rr) y[rr] = group_sum<P>(yacc[rr][0] + yacc[rr][1]);
        }
        if (p == 0) {
#pragma unroll
          for (int rr = 0; rr < R; ++rr) {
            if constexpr (!DEFER) o_y[0][s][g + NG * rr] = y[rr];
            if constexpr (SAVE) o_sa[s][g + NG * rr] = sa[rr];
          }
        }
      }
    };
    if (RS && chunk_reset) steps(Flag<true>{}); else steps(Flag<false>{});
    __syncthreads();
    write_chunk<F, NT, RB, DEFER ? P : 1>(y_ + in0 + row0, stride_t, t0, T, &o_y[0][0][0], L * RB);
    if constexpr (SAVE) write_chunk<float, NT, RB>(sa_out + in0 + row0, stride_t, t0, T, &o_sa[0][0]);
  }

  store_rows<R, M, P, NG>(sT + head * N * N, S, row0, g, p);
}

// ---- backward pass 1: dS rows, backwards in time ---------------------------------------------------------
// Same layout as fwd_kernel.  Outputs dv (input dtype), dsa = dS_t b_t (fp32) and ds0.
template <typename F, int RB, int R, int P, int U, bool DEFER, bool RS>
__global__ void __launch_bounds__(RB / R * P) bwd1_kernel(
    int T, int H, const F* __restrict__ r_, const F* __restrict__ w_, const F* __restrict__ k_,
    const F* __restrict__ a_, const F* __restrict__ b_, const F* __restrict__ dy_,
    const float* __restrict__ dsT, const unsigned char* __restrict__ starts, F* __restrict__ dv_,
    float* __restrict__ dsa_out, float* __restrict__ ds0) {
  constexpr int NG = RB / R, NT = NG * P, C = N / P, M = C / 4;
  static_assert(NT % 32 == 0 && C % 4 == 0 && P <= 16, "bad bwd1 config");
  const int p = threadIdx.x % P, g = threadIdx.x / P;
  const int row0 = blockIdx.x * RB, h = blockIdx.y, b = blockIdx.z;
  const long stride_t = (long)H * N;
  const long in0 = ((long)b * T * H + h) * N;
  const long head = (long)b * H + h;
  const int NC = (T + L - 1) / L;

  __shared__ __align__(16) RowTiles<RB> sh;
  __shared__ __align__(16) float o_dv[DEFER ? P : 1][L][RB], o_dsa[L][RB];
  __shared__ int s_st[L];
  const auto &s_r = sh.r, &s_w = sh.w, &s_k = sh.k, &s_a = sh.a, &s_b = sh.b;
  const auto& s_dy = sh.row;

  float dS[R][C];
  load_rows<R, M, P, NG>(dsT == nullptr ? nullptr : dsT + head * N * N, dS, row0, g, p);

  RowStage<F, NT, RB> stage{{}, {}, {}, {}, {}, {}, r_ + in0, w_ + in0, k_ + in0, a_ + in0, b_ + in0,
                            dy_ + in0 + row0, stride_t, T};
  stage.load((NC - 1) * L);

  for (int c = NC - 1; c >= 0; --c) {
    const int t0 = c * L;
    __syncthreads();
    stage.store(sh, t0);
    const int my_start = RS ? stage_starts(s_st, starts, b, T, t0) : 0;
    if (c > 0) stage.load(t0 - L);
    const bool chunk_reset = RS ? __syncthreads_or(my_start) != 0 : (__syncthreads(), false);

    auto steps = [&](auto rs_flag) {
      constexpr bool RST = decltype(rs_flag)::value;
#pragma unroll U
      for (int s = L - 1; s >= 0; --s) {
        float dyv[R];
#pragma unroll
        for (int rr = 0; rr < R; ++rr) dyv[rr] = s_dy[s][g + NG * rr];
        float dv[R][2], dsa[R][2];
#pragma unroll
        for (int rr = 0; rr < R; ++rr) dv[rr][0] = dv[rr][1] = dsa[rr][0] = dsa[rr][1] = 0.f;
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const int col = 4 * p + 4 * P * m;
          const float4 rq = *reinterpret_cast<const float4*>(&s_r[s][col]);
          const float4 kq = *reinterpret_cast<const float4*>(&s_k[s][col]);
          const float4 bq = *reinterpret_cast<const float4*>(&s_b[s][col]);
          const float rv[4] = {rq.x, rq.y, rq.z, rq.w}, kv[4] = {kq.x, kq.y, kq.z, kq.w};
          const float bv[4] = {bq.x, bq.y, bq.z, bq.w};
#pragma unroll
          for (int rr = 0; rr < R; ++rr)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              float& x = dS[rr][4 * m + q];
              x = fmaf(dyv[rr], rv[q], x);
              dv[rr][q & 1] = fmaf(x, kv[q], dv[rr][q & 1]);
              dsa[rr][q & 1] = fmaf(x, bv[q], dsa[rr][q & 1]);
            }
        }
        float dsat[R];
#pragma unroll
        for (int rr = 0; rr < R; ++rr) {
          dsat[rr] = group_sum<P>(dsa[rr][0] + dsa[rr][1]);
          if constexpr (DEFER) {
            o_dv[p][s][g + NG * rr] = dv[rr][0] + dv[rr][1];
          } else {
            dv[rr][0] = group_sum<P>(dv[rr][0] + dv[rr][1]);
          }
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const int col = 4 * p + 4 * P * m;
          const float4 wq = *reinterpret_cast<const float4*>(&s_w[s][col]);
          const float4 aq = *reinterpret_cast<const float4*>(&s_a[s][col]);
          const float wv[4] = {wq.x, wq.y, wq.z, wq.w}, av[4] = {aq.x, aq.y, aq.z, aq.w};
#pragma unroll
          for (int rr = 0; rr < R; ++rr)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              float& x = dS[rr][4 * m + q];
              x = fmaf(x, wv[q], dsat[rr] * av[q]);
            }
        }
        if (RST && s_st[s]) {  // the state entering this step was reset: nothing flows further back
#pragma unroll
          for (int rr = 0; rr < R; ++rr)
#pragma unroll
            for (int jj = 0; jj < C; ++jj) dS[rr][jj] = 0.f;
        }
        if (p == 0) {
#pragma unroll
          for (int rr = 0; rr < R; ++rr) {
            if constexpr (!DEFER) o_dv[0][s][g + NG * rr] = dv[rr][0];
            o_dsa[s][g + NG * rr] = dsat[rr];
          }
        }
      }
    };
    if (RS && chunk_reset) steps(Flag<true>{}); else steps(Flag<false>{});
    __syncthreads();
    write_chunk<F, NT, RB, DEFER ? P : 1>(dv_ + in0 + row0, stride_t, t0, T, &o_dv[0][0][0], L * RB);
    write_chunk<float, NT, RB>(dsa_out + in0 + row0, stride_t, t0, T, &o_dsa[0][0]);
  }

  store_rows<R, M, P, NG>(ds0 + head * N * N, dS, row0, g, p);
}

// ---- backward pass 2: columns of S and dS, backwards in time ------------------------------------------
// Block: CB columns of one head.  Thread (cp, rg): columns col0 + cp*CC + c (c < CC), rows 4rg + 4RG*m + q.
// DEFER: the five column sums are left as RG partials in shared memory and added when the chunk is
// written, so the step loop has no cross-lane traffic.
template <typename F, int CB, int CC, int RG, int U, bool DEFER, bool RS>
__global__ void __launch_bounds__(CB / CC * RG) bwd2_kernel(
    int T, int H, const F* __restrict__ r_, const F* __restrict__ w_, const F* __restrict__ k_,
    const F* __restrict__ v_, const F* __restrict__ a_, const F* __restrict__ b_, const F* __restrict__ dy_,
    const float* __restrict__ sa_, const float* __restrict__ dsa_, const float* __restrict__ ckpt,
    const float* __restrict__ sT, const float* __restrict__ dsT, const float* __restrict__ s0,
    const unsigned char* __restrict__ starts, F* __restrict__ dr_, F* __restrict__ dw_, F* __restrict__ dk_,
    F* __restrict__ da_, F* __restrict__ db_) {
  constexpr int NT = CB / CC * RG, RR = N / RG, M = RR / 4;
  static_assert(NT % 32 == 0 && RR % 4 == 0 && RG <= 16, "bad bwd2 config");
  constexpr int NP = DEFER ? RG : 1;                        // partial tiles per output
  constexpr int PS = L * CB + (DEFER ? 32 / RG * CC : 0);   // floats between partial tiles (bank padding)
  const int rg = threadIdx.x % RG, cp = threadIdx.x / RG;
  const int col0 = blockIdx.x * CB, h = blockIdx.y, b = blockIdx.z;
  const long stride_t = (long)H * N;
  const long in0 = ((long)b * T * H + h) * N;
  const long head = (long)b * H + h;
  const int NC = (T + L - 1) / L;

  __shared__ __align__(16) float s_dy[L][N], s_v[L][N], s_sa[L][N], s_dsa[L][N];
  __shared__ __align__(16) float s_r[L][CB], s_k[L][CB], s_b[L][CB], s_a[L][CB], s_sg[L][CB];
  __shared__ __align__(16) float o_part[5][NP * PS];  // dr, dk, db, da, d(decay)
  __shared__ int s_st[L];

  float S[RR][CC], dS[RR][CC], Snext[RR][CC];
  auto load_state = [&](const float* src, float (&X)[RR][CC]) {
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int cc = 0; cc < CC; ++cc)
          X[4 * m + q][cc] =
              src == nullptr ? 0.f : src[(4 * rg + 4 * RG * m + q) * N + col0 + cp * CC + cc];
  };
  load_state(sT + head * N * N, S);
  load_state(dsT == nullptr ? nullptr : dsT + head * N * N, dS);

  Chunk<F, NT, N> cdy, cv;
  Chunk<float, NT, N> csa, cdsa;
  Chunk<F, NT, CB> cr, ck, cb, ca, cw;
  auto load_all = [&](int t0) {
    cdy.load(dy_ + in0, stride_t, t0, T);
    cv.load(v_ + in0, stride_t, t0, T);
    csa.load(sa_ + in0, stride_t, t0, T);
    cdsa.load(dsa_ + in0, stride_t, t0, T);
    cr.load(r_ + in0 + col0, stride_t, t0, T);
    ck.load(k_ + in0 + col0, stride_t, t0, T);
    cb.load(b_ + in0 + col0, stride_t, t0, T);
    ca.load(a_ + in0 + col0, stride_t, t0, T);
    cw.load(w_ + in0 + col0, stride_t, t0, T);
  };
  load_all((NC - 1) * L);

  for (int c = NC - 1; c >= 0; --c) {
    const int t0 = c * L;
    __syncthreads();
    cdy.template store<Tf::Plain>(&s_dy[0][0], t0, T);
    cv.template store<Tf::Plain>(&s_v[0][0], t0, T);
    csa.template store<Tf::Plain>(&s_sa[0][0], t0, T);
    cdsa.template store<Tf::Plain>(&s_dsa[0][0], t0, T);
    cr.template store<Tf::Plain>(&s_r[0][0], t0, T);
    ck.template store<Tf::Plain>(&s_k[0][0], t0, T);
    cb.template store<Tf::Plain>(&s_b[0][0], t0, T);
    ca.template store<Tf::Plain>(&s_a[0][0], t0, T);
    cw.template store<Tf::Sigmoid>(&s_sg[0][0], t0, T);
    const int my_start = RS ? stage_starts(s_st, starts, b, T, t0) : 0;
    if (c + 1 < NC) {  // exact state after (c+1)*L steps, loaded during the previous chunk
#pragma unroll
      for (int i = 0; i < RR; ++i)
#pragma unroll
        for (int cc = 0; cc < CC; ++cc) S[i][cc] = Snext[i][cc];
    }
    if (c > 0) {
      load_all(t0 - L);
      load_state(ckpt + (head * NC + c) * N * N, Snext);
    }
    const bool chunk_reset = RS ? __syncthreads_or(my_start) != 0 : (__syncthreads(), false);

    auto steps = [&](auto rs_flag) {
      constexpr bool RST = decltype(rs_flag)::value;
#pragma unroll U
      for (int s = L - 1; s >= 0; --s) {
        const bool reset = RST && s_st[s] != 0;
        float pdr[CC], pdk[CC], pdb[CC], pdd[CC], pda[CC];
        float rj[CC], kwj[CC], bwj[CC], aj[CC], wj[CC], wij[CC];
#pragma unroll
        for (int cc = 0; cc < CC; ++cc) {
          const int j = cp * CC + cc;
          const float sg = s_sg[s][j];
          wj[cc] = __expf(-DECAY_SCALE * sg), wij[cc] = __expf(DECAY_SCALE * sg);
          rj[cc] = s_r[s][j], aj[cc] = s_a[s][j];
          kwj[cc] = s_k[s][j] * wij[cc], bwj[cc] = s_b[s][j] * wij[cc];
          pdr[cc] = pdk[cc] = pdb[cc] = pdd[cc] = pda[cc] = 0.f;
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const int row = 4 * rg + 4 * RG * m;
          const float4 dyq = *reinterpret_cast<const float4*>(&s_dy[s][row]);
          const float4 vq = *reinterpret_cast<const float4*>(&s_v[s][row]);
          const float4 saq = *reinterpret_cast<const float4*>(&s_sa[s][row]);
          const float4 dsaq = *reinterpret_cast<const float4*>(&s_dsa[s][row]);
          const float dyv[4] = {dyq.x, dyq.y, dyq.z, dyq.w}, vv[4] = {vq.x, vq.y, vq.z, vq.w};
          const float sav[4] = {saq.x, saq.y, saq.z, saq.w}, dsav[4] = {dsaq.x, dsaq.y, dsaq.z, dsaq.w};
#pragma unroll
          for (int q = 0; q < 4; ++q)
#pragma unroll
            for (int cc = 0; cc < CC; ++cc) {
              float& s_ = S[4 * m + q][cc];
              float& d_ = dS[4 * m + q][cc];
              d_ = fmaf(dyv[q], rj[cc], d_);
              pdr[cc] = fmaf(s_, dyv[q], pdr[cc]);
              s_ = reset ? 0.f : fmaf(s_, wij[cc], -fmaf(vv[q], kwj[cc], sav[q] * bwj[cc]));  // S_{t-1}
              pdk[cc] = fmaf(d_, vv[q], pdk[cc]);
              pdb[cc] = fmaf(d_, sav[q], pdb[cc]);
              pdd[cc] = fmaf(d_, s_, pdd[cc]);
              pda[cc] = fmaf(s_, dsav[q], pda[cc]);
              d_ = reset ? 0.f : fmaf(d_, wj[cc], dsav[q] * aj[cc]);
            }
        }
        if (RST && reset && s > 0) {  // S before the reset: replay steps t0 .. t0+s-1 from the state entering the chunk
          if (c > 0) {
#pragma unroll
            for (int i = 0; i < RR; ++i)
#pragma unroll
              for (int cc = 0; cc < CC; ++cc) S[i][cc] = Snext[i][cc];
          } else {
            load_state(s0 == nullptr ? nullptr : s0 + head * N * N, S);
          }
#pragma unroll 1
          for (int s2 = 0; s2 < s; ++s2) {
            const bool zero = s_st[s2] != 0;
#pragma unroll
            for (int cc = 0; cc < CC; ++cc) {
              const int j = cp * CC + cc;
              const float w2 = __expf(-DECAY_SCALE * s_sg[s2][j]), b2 = s_b[s2][j], k2 = s_k[s2][j];
#pragma unroll
              for (int m = 0; m < M; ++m)
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                  const int row = 4 * rg + 4 * RG * m + q;
                  float& x = S[4 * m + q][cc];
                  x = fmaf(zero ? 0.f : x, w2, fmaf(s_sa[s2][row], b2, s_v[s2][row] * k2));
                }
            }
          }
        }
        if constexpr (DEFER) {
#pragma unroll
          for (int cc = 0; cc < CC; ++cc) {
            const int o = rg * PS + s * CB + cp * CC + cc;
            o_part[0][o] = pdr[cc], o_part[1][o] = pdk[cc], o_part[2][o] = pdb[cc];
            o_part[3][o] = pda[cc], o_part[4][o] = pdd[cc];
          }
        } else {
#pragma unroll
          for (int cc = 0; cc < CC; ++cc) {
            pdr[cc] = group_sum<RG>(pdr[cc]);
            pdk[cc] = group_sum<RG>(pdk[cc]);
            pdb[cc] = group_sum<RG>(pdb[cc]);
            pdd[cc] = group_sum<RG>(pdd[cc]);
            pda[cc] = group_sum<RG>(pda[cc]);
          }
          if (rg == 0) {
#pragma unroll
            for (int cc = 0; cc < CC; ++cc) {
              const int o = s * CB + cp * CC + cc;
              o_part[0][o] = pdr[cc], o_part[1][o] = pdk[cc], o_part[2][o] = pdb[cc];
              o_part[3][o] = pda[cc], o_part[4][o] = pdd[cc];
            }
          }
        }
      }
    };
    if (RS && chunk_reset) steps(Flag<true>{}); else steps(Flag<false>{});
    __syncthreads();
    write_chunk<F, NT, CB, NP>(dr_ + in0 + col0, stride_t, t0, T, o_part[0], PS);
    write_chunk<F, NT, CB, NP>(dk_ + in0 + col0, stride_t, t0, T, o_part[1], PS);
    write_chunk<F, NT, CB, NP>(db_ + in0 + col0, stride_t, t0, T, o_part[2], PS);
    write_chunk<F, NT, CB, NP>(da_ + in0 + col0, stride_t, t0, T, o_part[3], PS);
    // d/dw of exp(-c sigmoid(w)) = -c * decay * s (1 - s)
    write_chunk<F, NT, CB, NP>(dw_ + in0 + col0, stride_t, t0, T, o_part[4], PS, [&](int s, int j, float x) {
      const float sg = s_sg[s][j];
      return x * (-DECAY_SCALE) * __expf(-DECAY_SCALE * sg) * sg * (1.f - sg);
    });
  }
}

// ---- single-token step --------------------------------------------------------------------------------
// One block per head, 256 threads: row i = tid / 4, columns 4p + 16m + q.
template <typename F>
__global__ void __launch_bounds__(256) step_kernel(int H, const F* __restrict__ r_, const F* __restrict__ w_,
                                                  const F* __restrict__ k_, const F* __restrict__ v_,
                                                  const F* __restrict__ a_, const F* __restrict__ b_,
                                                  const float* s_in, F* __restrict__ y_,
                                                  float* s_out) {  // s_in may alias s_out
  constexpr int P = 4, C = N / P;
  const int p = threadIdx.x % P, i = threadIdx.x / P;
  const long head = (long)blockIdx.y * H + blockIdx.x;
  const long vec = head * N;
  __shared__ float s_r[N], s_w[N], s_k[N], s_a[N], s_b[N];
  if (threadIdx.x < N) {
    const int j = threadIdx.x;
    s_r[j] = IO<F>::to_f(r_[vec + j]);
    s_w[j] = __expf(-DECAY_SCALE * sigmoidf_(IO<F>::to_f(w_[vec + j])));
    s_k[j] = IO<F>::to_f(k_[vec + j]);
    s_a[j] = IO<F>::to_f(a_[vec + j]);
    s_b[j] = IO<F>::to_f(b_[vec + j]);
  }
  const float vi = IO<F>::to_f(v_[vec + i]);
  float S[C];
#pragma unroll
  for (int m = 0; m < C / 4; ++m) {
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (s_in != nullptr) x = *reinterpret_cast<const float4*>(s_in + (head * N + i) * N + 4 * p + 16 * m);
    S[4 * m] = x.x, S[4 * m + 1] = x.y, S[4 * m + 2] = x.z, S[4 * m + 3] = x.w;
  }
  __syncthreads();
  float sa = 0.f;
#pragma unroll
  for (int m = 0; m < C / 4; ++m)
#pragma unroll
    for (int q = 0; q < 4; ++q) sa = fmaf(S[4 * m + q], s_a[4 * p + 16 * m + q], sa);
  sa = group_sum<P>(sa);
  float y = 0.f;
#pragma unroll
  for (int m = 0; m < C / 4; ++m)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int j = 4 * p + 16 * m + q;
      S[4 * m + q] = fmaf(S[4 * m + q], s_w[j], fmaf(sa, s_b[j], vi * s_k[j]));
      y = fmaf(S[4 * m + q], s_r[j], y);
    }
  y = group_sum<P>(y);
  if (p == 0) y_[vec + i] = IO<F>::from_f(y);
#pragma unroll
  for (int m = 0; m < C / 4; ++m)
    *reinterpret_cast<float4*>(s_out + (head * N + i) * N + 4 * p + 16 * m) =
        make_float4(S[4 * m], S[4 * m + 1], S[4 * m + 2], S[4 * m + 3]);
}

// ---- launch configurations ------------------------------------------------------------------------------
// Args' six input sequences in the kernels' element type (Args holds them untyped for the binding).
template <typename F>
struct Inputs {
  const F *r, *w, *k, *v, *a, *b;
  explicit Inputs(const Args& x)
      : r(static_cast<const F*>(x.r)), w(static_cast<const F*>(x.w)), k(static_cast<const F*>(x.k)),
        v(static_cast<const F*>(x.v)), a(static_cast<const F*>(x.a)), b(static_cast<const F*>(x.b)) {}
};

// Row kernels (fwd, bwd1): RB rows per block, R rows per thread, P threads per row.
// Column kernel (bwd2): CB columns per block, CC columns per thread, RG threads per column.

template <typename F, bool SAVE, bool RS>
cudaError_t launch_fwd(int cfg, const Args& a, cudaStream_t st) {
  const Inputs<F> in(a);
#define WKV7_FWD(RB, R, P, U, D)                                                                          \
  fwd_kernel<F, RB, R, P, U, D, SAVE, RS><<<dim3(N / RB, a.H, a.B), RB / R * P, 0, st>>>(                          \
      a.T, a.H, in.r, in.w, in.k, in.v, in.a, in.b, a.s0, a.starts, static_cast<F*>(a.y), a.sT, a.sa, a.ckpt)
  switch (cfg) {
    case 0: WKV7_FWD(16, 1, 4, 16, true); break;
    case 1: WKV7_FWD(32, 2, 4, 4, true); break;
    case 2: WKV7_FWD(64, 4, 4, 2, true); break;
#ifdef WKV7_ALL_CONFIGS
    case 3: WKV7_FWD(16, 1, 8, 16, true); break;
    case 4: WKV7_FWD(16, 1, 4, 2, false); break;
    case 5: WKV7_FWD(32, 2, 4, 2, false); break;
    case 6: WKV7_FWD(64, 4, 4, 2, false); break;
    case 7: WKV7_FWD(32, 2, 4, 16, true); break;
#endif
    default: return cudaErrorInvalidValue;
  }
#undef WKV7_FWD
  return cudaGetLastError();
}

template <typename F, bool RS>
cudaError_t launch_bwd(int cfg1, int cfg2, const Args& a, cudaStream_t st) {
  const Inputs<F> in(a);
  const F* dy = static_cast<const F*>(a.dy);
#define WKV7_BWD1(RB, R, P, U, D)                                                                         \
  bwd1_kernel<F, RB, R, P, U, D, RS><<<dim3(N / RB, a.H, a.B), RB / R * P, 0, st>>>(                               \
      a.T, a.H, in.r, in.w, in.k, in.a, in.b, dy, a.dsT, a.starts, static_cast<F*>(a.dv), a.dsa, a.ds0)
  switch (cfg1) {
    case 0: WKV7_BWD1(16, 1, 4, 16, true); break;
    case 1: WKV7_BWD1(32, 2, 4, 4, true); break;
    case 2: WKV7_BWD1(64, 4, 4, 2, true); break;
#ifdef WKV7_ALL_CONFIGS
    case 3: WKV7_BWD1(16, 1, 8, 16, true); break;
    case 4: WKV7_BWD1(16, 1, 4, 2, false); break;
    case 5: WKV7_BWD1(32, 2, 4, 2, false); break;
    case 6: WKV7_BWD1(64, 4, 4, 2, false); break;
    case 7: WKV7_BWD1(32, 2, 4, 16, true); break;
#endif
    default: return cudaErrorInvalidValue;
  }
#undef WKV7_BWD1
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
#define WKV7_BWD2(CB, CC, RG, U, D)                                                                       \
  bwd2_kernel<F, CB, CC, RG, U, D, RS><<<dim3(N / CB, a.H, a.B), CB / CC * RG, 0, st>>>(                           \
      a.T, a.H, in.r, in.w, in.k, in.v, in.a, in.b, dy, a.sa, a.dsa, a.ckpt, a.sT, a.dsT, a.s0, a.starts,        \
      static_cast<F*>(a.dr), static_cast<F*>(a.dw), static_cast<F*>(a.dk), static_cast<F*>(a.da),                \
      static_cast<F*>(a.db))
  switch (cfg2) {
    case 4: WKV7_BWD2(16, 1, 4, 2, true); break;
    case 6: WKV7_BWD2(32, 1, 2, 2, true); break;
#ifdef WKV7_ALL_CONFIGS
    case 0: WKV7_BWD2(16, 1, 4, 1, false); break;
    case 1: WKV7_BWD2(32, 1, 4, 1, false); break;
    case 2: WKV7_BWD2(16, 1, 8, 1, false); break;
    case 3: WKV7_BWD2(32, 1, 2, 1, false); break;
    case 5: WKV7_BWD2(16, 1, 4, 4, true); break;
    case 7: WKV7_BWD2(16, 1, 4, 8, true); break;
#endif
    default: return cudaErrorInvalidValue;
  }
#undef WKV7_BWD2
  return cudaGetLastError();
}

template <typename F>
cudaError_t launch_step(const Args& a, cudaStream_t st) {
  const Inputs<F> in(a);
  step_kernel<F><<<dim3(a.H, a.B), 256, 0, st>>>(a.H, in.r, in.w, in.k, in.v, in.a, in.b, a.s0,
                                                  static_cast<F*>(a.y), a.sT);
  return cudaGetLastError();
}

// Resets are a template parameter: rows without `starts` run kernels with no reset code at all (the flag
// test per step and the replay block of pass 2 cost 19-32% when compiled in unconditionally).
template <typename F, bool SAVE>
cudaError_t launch_fwd_rs(int cfg, const Args& a, cudaStream_t st) {
  return a.starts != nullptr ? launch_fwd<F, SAVE, true>(cfg, a, st) : launch_fwd<F, SAVE, false>(cfg, a, st);
}

template <typename F>
cudaError_t launch_bwd_rs(int cfg1, int cfg2, const Args& a, cudaStream_t st) {
  return a.starts != nullptr ? launch_bwd<F, true>(cfg1, cfg2, a, st) : launch_bwd<F, false>(cfg1, cfg2, a, st);
}

}  // namespace

int chunk_len() { return L; }

bool all_configs() {
#ifdef WKV7_ALL_CONFIGS
  return true;
#else
  return false;
#endif
}

cudaError_t forward(DType dt, int cfg, bool save, const Args& a, cudaStream_t st) {
  if (dt == DType::BF16)
    return save ? launch_fwd_rs<__nv_bfloat16, true>(cfg, a, st) : launch_fwd_rs<__nv_bfloat16, false>(cfg, a, st);
  return save ? launch_fwd_rs<float, true>(cfg, a, st) : launch_fwd_rs<float, false>(cfg, a, st);
}

cudaError_t backward(DType dt, int cfg1, int cfg2, const Args& a, cudaStream_t st) {
  if (dt == DType::BF16) return launch_bwd_rs<__nv_bfloat16>(cfg1, cfg2, a, st);
  return launch_bwd_rs<float>(cfg1, cfg2, a, st);
}

cudaError_t step(DType dt, const Args& a, cudaStream_t st) {
  return dt == DType::BF16 ? launch_step<__nv_bfloat16>(a, st) : launch_step<float>(a, st);
}

}  // namespace wkv7
