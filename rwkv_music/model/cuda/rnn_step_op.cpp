// Torch binding for the fused RNN-mode step (rnn_step_kernels.cu): shape/dtype checks, workspace, stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <vector>

#include "rnn_step.h"

namespace {

constexpr int64_t HEAD = 64;

rnn_step::DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return rnn_step::DType::F32;
    case at::kBFloat16:
      return rnn_step::DType::BF16;
    case at::kHalf:
      return rnn_step::DType::F16;
    default:
      TORCH_CHECK(false, "rnn_step: weights must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

void need(const at::Tensor& x, const at::Tensor& emb, at::IntArrayRef shape, bool model_dtype, const char* name) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "rnn_step: ", name, " must be a contiguous CUDA tensor");
  TORCH_CHECK(x.device() == emb.device(), "rnn_step: ", name, " is on another device");
  TORCH_CHECK(x.sizes() == shape, "rnn_step: ", name, " has shape ", x.sizes(), ", expected ", shape);
  if (model_dtype) {
    TORCH_CHECK(x.scalar_type() == emb.scalar_type(), "rnn_step: ", name, " must have the weights' dtype ",
                emb.scalar_type(), ", got ", x.scalar_type());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "rnn_step: ", name, " must be float32");
  }
}

// One token per sequence through the whole model; updates att_x, wkv, ffn_x in place, returns fp32 logits [B, V].
// lora = (dw, da, dv, dg), the LoRA ranks.
at::Tensor rnn_step_forward(at::Tensor tokens, at::Tensor emb, at::Tensor head, at::Tensor glob, at::Tensor vec,
                            at::Tensor proj, at::Tensor up, at::Tensor out, at::Tensor ffn_k, at::Tensor ffn_v,
                            at::Tensor att_x, at::Tensor wkv, at::Tensor ffn_x, std::vector<int64_t> lora) {
  TORCH_CHECK(lora.size() == 4, "rnn_step: lora must hold the four LoRA ranks");
  TORCH_CHECK(emb.dim() == 2 && vec.dim() == 3 && ffn_k.dim() == 3 && att_x.dim() == 3, "rnn_step: bad ranks");
  const int64_t V = emb.size(0), C = emb.size(1), L = vec.size(0), F = ffn_k.size(1), B = tokens.size(0);
  const int64_t H = C / HEAD, R = lora[0] + lora[1] + lora[2] + lora[3], P = 3 * C + R;
  TORCH_CHECK(C % HEAD == 0 && F % 8 == 0 && C <= 8192 && R <= 8192, "rnn_step: needs n_embd a multiple of 64 "
              "(at most 8192), dim_ffn a multiple of 8 and the LoRA ranks at most 8192 together");
  TORCH_CHECK(B >= 1 && tokens.scalar_type() == at::kLong && tokens.is_cuda() && tokens.is_contiguous(),
              "rnn_step: tokens must be a contiguous int64 CUDA tensor [B], B >= 1");
  need(emb, emb, {V, C}, true, "emb");
  need(head, emb, {V, C}, true, "head");
  need(glob, emb, {4, C}, false, "glob");
  need(vec, emb, {L, rnn_step::NVEC, C}, false, "vec");
  need(proj, emb, {L, P, C}, true, "proj");
  need(up, emb, {L, R, C}, true, "up");
  need(out, emb, {L, C, C}, true, "out");
  need(ffn_k, emb, {L, F, C}, true, "ffn_k");
  need(ffn_v, emb, {L, C, F}, true, "ffn_v");
  need(att_x, emb, {L, B, C}, true, "att_x");
  need(wkv, emb, {L, B, H, HEAD, HEAD}, false, "wkv");
  need(ffn_x, emb, {L, B, C}, true, "ffn_x");
  TORCH_CHECK(tokens.device() == emb.device(), "rnn_step: tokens are on another device");

  const c10::cuda::CUDAGuard guard(emb.device());
  const auto f32 = emb.options().dtype(at::kFloat);
  at::Tensor work = at::empty({rnn_step::workspace_floats(B, C, F, P)}, f32);
  at::Tensor logits = at::empty({B, V}, f32);
  rnn_step::StepArgs a;
  a.B = (int)B, a.C = (int)C, a.H = (int)H, a.V = (int)V, a.F = (int)F, a.L = (int)L;
  a.dw = (int)lora[0], a.da = (int)lora[1], a.dv = (int)lora[2], a.dg = (int)lora[3];
  a.tokens = tokens.data_ptr<int64_t>();
  a.emb = emb.data_ptr(), a.head = head.data_ptr();
  a.glob = glob.data_ptr<float>(), a.vec = vec.data_ptr<float>();
  a.proj = proj.data_ptr(), a.up = up.data_ptr(), a.out = out.data_ptr();
  a.ffn_k = ffn_k.data_ptr(), a.ffn_v = ffn_v.data_ptr();
  a.att_x = att_x.data_ptr(), a.wkv = wkv.data_ptr<float>(), a.ffn_x = ffn_x.data_ptr();
  a.work = work.data_ptr<float>(), a.logits = logits.data_ptr<float>();
  const cudaError_t e = rnn_step::step(dtype_of(emb), a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(e == cudaSuccess, "rnn_step kernel launch failed: ", cudaGetErrorString(e));
  return logits;
}

}  // namespace

void bind_rnn_step(pybind11::module_& m) {
  m.def("rnn_step", &rnn_step_forward, "fused RNN-mode step of the whole model (one token per sequence)");
  m.def("rnn_step_nvec", []() { return (int64_t)rnn_step::NVEC; }, "rows of the per-layer vector table");
}
