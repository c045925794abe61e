// Torch binding for the RWKV-7 WKV kernels: shape/dtype checks, allocation, stream.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "wkv7.h"

namespace {

constexpr int64_t HEAD = 64;

wkv7::DType dtype_of(const at::Tensor& x) {
  if (x.scalar_type() == at::kBFloat16) return wkv7::DType::BF16;
  TORCH_CHECK(x.scalar_type() == at::kFloat, "wkv7: inputs must be bfloat16 or float32, got ", x.scalar_type());
  return wkv7::DType::F32;
}

void check_seq(const at::Tensor& x, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "wkv7: ", name, " must be a contiguous CUDA tensor");
  TORCH_CHECK(x.sizes() == ref.sizes(), "wkv7: ", name, " has shape ", x.sizes(), ", expected ", ref.sizes());
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), "wkv7: ", name, " dtype differs from r");
}

const float* opt_state(const std::optional<at::Tensor>& s, int64_t B, int64_t H, const char* name) {
  if (!s.has_value() || !s->defined()) return nullptr;
  TORCH_CHECK(s->is_cuda() && s->is_contiguous() && s->scalar_type() == at::kFloat, "wkv7: ", name,
              " must be a contiguous float32 CUDA tensor");
  TORCH_CHECK(s->dim() == 4 && s->size(0) == B && s->size(1) == H && s->size(2) == HEAD && s->size(3) == HEAD,
              "wkv7: ", name, " must have shape [B, H, 64, 64]");
  return s->data_ptr<float>();
}

const unsigned char* opt_starts(const std::optional<at::Tensor>& st, int64_t B, int64_t T) {
  if (!st.has_value() || !st->defined()) return nullptr;
  TORCH_CHECK(st->is_cuda() && st->is_contiguous() && st->scalar_type() == at::kBool,
              "wkv7: starts must be a contiguous bool CUDA tensor");
  TORCH_CHECK(st->dim() == 2 && st->size(0) == B && st->size(1) == T, "wkv7: starts must have shape [B, T]");
  return reinterpret_cast<const unsigned char*>(st->data_ptr<bool>());
}

void check(cudaError_t e) { TORCH_CHECK(e == cudaSuccess, "wkv7 kernel launch failed: ", cudaGetErrorString(e)); }

// Checks the six input sequences (alike in shape and dtype, contiguous, on the GPU) and points new Args at them;
// the caller fills in B, T, H and the rest.
wkv7::Args input_args(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& a, const at::Tensor& b) {
  check_seq(r, r, "r");
  check_seq(w, r, "w");
  check_seq(k, r, "k");
  check_seq(v, r, "v");
  check_seq(a, r, "a");
  check_seq(b, r, "b");
  wkv7::Args args;
  args.r = r.data_ptr(), args.w = w.data_ptr(), args.k = k.data_ptr();
  args.v = v.data_ptr(), args.a = a.data_ptr(), args.b = b.data_ptr();
  return args;
}

// Returns [y, sT, sa, ckpt]; sa and ckpt are empty unless save.
std::vector<at::Tensor> forward(at::Tensor r, at::Tensor w, at::Tensor k, at::Tensor v, at::Tensor a, at::Tensor b,
                                std::optional<at::Tensor> s0, std::optional<at::Tensor> starts, bool save,
                                int64_t cfg) {
  TORCH_CHECK(r.dim() == 4 && r.size(3) == HEAD, "wkv7: r must be [B, T, H, 64]");
  wkv7::Args args = input_args(r, w, k, v, a, b);
  const c10::cuda::CUDAGuard guard(r.device());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
  TORCH_CHECK(T >= 1, "wkv7: T must be >= 1");
  const int64_t NC = (T + wkv7::chunk_len() - 1) / wkv7::chunk_len();
  const auto f32 = r.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(r);
  at::Tensor sT = at::empty({B, H, HEAD, HEAD}, f32);
  at::Tensor sa = save ? at::empty({B, T, H, HEAD}, f32) : at::empty({0}, f32);
  at::Tensor ck = save ? at::empty({B, H, NC, HEAD, HEAD}, f32) : at::empty({0}, f32);
  args.B = (int)B, args.T = (int)T, args.H = (int)H;
  args.s0 = opt_state(s0, B, H, "state");
  args.starts = opt_starts(starts, B, T);
  args.y = y.data_ptr();
  args.sT = sT.data_ptr<float>();
  args.sa = save ? sa.data_ptr<float>() : nullptr;
  args.ckpt = save ? ck.data_ptr<float>() : nullptr;
  check(wkv7::forward(dtype_of(r), (int)cfg, save, args, c10::cuda::getCurrentCUDAStream()));
  return {y, sT, sa, ck};
}

// Returns [dr, dw, dk, dv, da, db, ds0].
std::vector<at::Tensor> backward(at::Tensor r, at::Tensor w, at::Tensor k, at::Tensor v, at::Tensor a, at::Tensor b,
                                 at::Tensor sT, at::Tensor sa, at::Tensor ck, at::Tensor dy,
                                 std::optional<at::Tensor> dsT, std::optional<at::Tensor> s0,
                                 std::optional<at::Tensor> starts, int64_t cfg1, int64_t cfg2) {
  wkv7::Args args = input_args(r, w, k, v, a, b);
  check_seq(dy, r, "dy");
  const c10::cuda::CUDAGuard guard(r.device());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
  const int64_t NC = (T + wkv7::chunk_len() - 1) / wkv7::chunk_len();
  TORCH_CHECK(sa.numel() == B * T * H * HEAD && ck.numel() == B * H * NC * HEAD * HEAD,
              "wkv7: backward needs the tensors saved by a training forward");
  const auto f32 = r.options().dtype(at::kFloat);
  at::Tensor dr = at::empty_like(r), dw = at::empty_like(r), dk = at::empty_like(r), dv = at::empty_like(r);
  at::Tensor da = at::empty_like(r), db = at::empty_like(r);
  at::Tensor dsa = at::empty({B, T, H, HEAD}, f32);
  at::Tensor ds0 = at::empty({B, H, HEAD, HEAD}, f32);
  args.B = (int)B, args.T = (int)T, args.H = (int)H;
  args.sT = opt_state(sT, B, H, "final state") == nullptr ? nullptr : sT.data_ptr<float>();
  TORCH_CHECK(args.sT != nullptr, "wkv7: backward needs the final state");
  args.sa = sa.data_ptr<float>();
  args.ckpt = ck.data_ptr<float>();
  args.dy = dy.data_ptr();
  args.dsT = opt_state(dsT, B, H, "final state gradient");
  args.s0 = opt_state(s0, B, H, "initial state");
  args.starts = opt_starts(starts, B, T);
  args.dsa = dsa.data_ptr<float>();
  args.ds0 = ds0.data_ptr<float>();
  args.dr = dr.data_ptr(), args.dw = dw.data_ptr(), args.dk = dk.data_ptr();
  args.dv = dv.data_ptr(), args.da = da.data_ptr(), args.db = db.data_ptr();
  check(wkv7::backward(dtype_of(r), (int)cfg1, (int)cfg2, args, c10::cuda::getCurrentCUDAStream()));
  return {dr, dw, dk, dv, da, db, ds0};
}

// One token: inputs [B, H, 64], state [B, H, 64, 64] fp32 or None. Returns [y, new_state]; when `out` is
// given the new state is written there (it may alias `state`: each block reads its head before writing).
std::vector<at::Tensor> step(at::Tensor r, at::Tensor w, at::Tensor k, at::Tensor v, at::Tensor a, at::Tensor b,
                             std::optional<at::Tensor> state, std::optional<at::Tensor> out) {
  TORCH_CHECK(r.dim() == 3 && r.size(2) == HEAD, "wkv7 step: r must be [B, H, 64]");
  wkv7::Args args = input_args(r, w, k, v, a, b);
  const c10::cuda::CUDAGuard guard(r.device());
  const int64_t B = r.size(0), H = r.size(1);
  at::Tensor y = at::empty_like(r);
  at::Tensor s_out;
  if (out.has_value() && out->defined()) {
    opt_state(out, B, H, "out");
    s_out = *out;
  } else {
    s_out = at::empty({B, H, HEAD, HEAD}, r.options().dtype(at::kFloat));
  }
  args.B = (int)B, args.T = 1, args.H = (int)H;
  args.s0 = opt_state(state, B, H, "state");
  args.y = y.data_ptr();
  args.sT = s_out.data_ptr<float>();
  check(wkv7::step(dtype_of(r), args, c10::cuda::getCurrentCUDAStream()));
  return {y, s_out};
}

}  // namespace

void bind_rnn_step(pybind11::module_& m);  // rnn_step_op.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "WKV7 forward");
  m.def("backward", &backward, "WKV7 backward");
  m.def("step", &step, "WKV7 single-token step");
  m.def("chunk_len", &wkv7::chunk_len, "checkpoint interval in steps");
  m.def("all_configs", &wkv7::all_configs, "whether every launch configuration was compiled");
  bind_rnn_step(m);
}
