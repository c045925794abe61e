// Torch binding for the fused inference paths: the RNN-mode step (rnn_step_kernels.cu) and the prefill, a host
// loop over layers of its element-wise kernels (prefill_kernels.cu), cuBLAS products and the WKV forward kernel.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "prefill.h"
#include "rnn_step.h"
#include "wkv7.h"

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
      TORCH_CHECK(false, "fast_step: weights must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

void need(const at::Tensor& x, const at::Tensor& emb, at::IntArrayRef shape, bool model_dtype, const char* name) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "fast_step: ", name, " must be a contiguous CUDA tensor");
  TORCH_CHECK(x.device() == emb.device(), "fast_step: ", name, " is on another device");
  TORCH_CHECK(x.sizes() == shape, "fast_step: ", name, " has shape ", x.sizes(), ", expected ", shape);
  if (model_dtype) {
    TORCH_CHECK(x.scalar_type() == emb.scalar_type(), "fast_step: ", name, " must have the weights' dtype ",
                emb.scalar_type(), ", got ", x.scalar_type());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "fast_step: ", name, " must be float32");
  }
}

// The packed weights (fast_step.py) and a state of B sequences.
void check_pack(const at::Tensor& emb, const at::Tensor& head, const at::Tensor& glob, const at::Tensor& vec,
                const at::Tensor& proj, const at::Tensor& out, const at::Tensor& ffn_k, const at::Tensor& ffn_v,
                const at::Tensor& att_x, const at::Tensor& wkv, const at::Tensor& ffn_x, int64_t B, int64_t P) {
  const int64_t V = emb.size(0), C = emb.size(1), L = vec.size(0), F = ffn_k.size(1), H = C / HEAD;
  need(emb, emb, {V, C}, true, "emb");
  need(head, emb, {V, C}, true, "head");
  need(glob, emb, {4, C}, false, "glob");
  need(vec, emb, {L, rnn_step::NVEC, C}, false, "vec");
  need(proj, emb, {L, P, C}, true, "proj");
  need(out, emb, {L, C, C}, true, "out");
  need(ffn_k, emb, {L, F, C}, true, "ffn_k");
  need(ffn_v, emb, {L, C, F}, true, "ffn_v");
  need(att_x, emb, {L, B, C}, true, "att_x");
  need(wkv, emb, {L, B, H, HEAD, HEAD}, false, "wkv");
  need(ffn_x, emb, {L, B, C}, true, "ffn_x");
}

// One token per sequence through the whole model; updates att_x, wkv, ffn_x in place, returns fp32 logits [B, V].
// lora = (dw, da, dv, dg), the LoRA ranks. tensor_cores: bf16 weights' products on tensor cores (below sm_80, and for
// other dtypes, they stay on the CUDA cores whatever is asked).
at::Tensor rnn_step_forward(at::Tensor tokens, at::Tensor emb, at::Tensor head, at::Tensor glob, at::Tensor vec,
                            at::Tensor proj, at::Tensor up, at::Tensor out, at::Tensor ffn_k, at::Tensor ffn_v,
                            at::Tensor att_x, at::Tensor wkv, at::Tensor ffn_x, std::vector<int64_t> lora,
                            bool tensor_cores) {
  TORCH_CHECK(lora.size() == 4, "rnn_step: lora must hold the four LoRA ranks");
  TORCH_CHECK(emb.dim() == 2 && vec.dim() == 3 && ffn_k.dim() == 3 && att_x.dim() == 3, "rnn_step: bad ranks");
  const int64_t V = emb.size(0), C = emb.size(1), L = vec.size(0), F = ffn_k.size(1), B = tokens.size(0);
  const int64_t H = C / HEAD, R = lora[0] + lora[1] + lora[2] + lora[3], P = 3 * C + R;
  TORCH_CHECK(C % HEAD == 0 && F % 8 == 0 && C <= 8192 && R <= 8192, "rnn_step: needs n_embd a multiple of 64 "
              "(at most 8192), dim_ffn a multiple of 8 and the LoRA ranks at most 8192 together");
  TORCH_CHECK(B >= 1 && tokens.scalar_type() == at::kLong && tokens.is_cuda() && tokens.is_contiguous(),
              "rnn_step: tokens must be a contiguous int64 CUDA tensor [B], B >= 1");
  check_pack(emb, head, glob, vec, proj, out, ffn_k, ffn_v, att_x, wkv, ffn_x, B, P);
  need(up, emb, {vec.size(0), R, C}, true, "up");
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
  // below sm_80 the kernels hold no mma instruction (they would trap): the CUDA-core products there
  int dev = 0, major = 0;
  TORCH_CHECK(cudaGetDevice(&dev) == cudaSuccess &&
                  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess,
              "rnn_step: could not read the device's compute capability");
  a.tensor_cores = tensor_cores && major >= 8;
  const cudaError_t e = rnn_step::step(dtype_of(emb), a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(e == cudaSuccess, "rnn_step kernel launch failed: ", cudaGetErrorString(e));
  return logits;
}

void check(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "prefill: ", what, " failed: ", cudaGetErrorString(e));
}

// The parallel forward over tokens [B, T] from the state (att_x, wkv, ffn_x; updated in place to the state after
// the last token), returning fp32 logits [B, V] of each row's last token. proj is the step's pack (only its
// receptance, key and value rows are read); lora_down [L, 4, C, RM] and lora_up [L, 4, RM, C] hold the LoRA
// projections in the order v, w, a, g (the lerp slots MIX_V .. MIX_G), zero-padded to one rank RM, so each
// direction is one batched product. wkv_cfg: the WKV forward's launch configuration (wkv_cuda.default_config).
at::Tensor prefill_forward(at::Tensor tokens, at::Tensor emb, at::Tensor head, at::Tensor glob, at::Tensor vec,
                           at::Tensor proj, at::Tensor lora_down, at::Tensor lora_up, at::Tensor out, at::Tensor ffn_k,
                           at::Tensor ffn_v, at::Tensor att_x, at::Tensor wkv, at::Tensor ffn_x, int64_t wkv_cfg) {
  TORCH_CHECK(emb.dim() == 2 && vec.dim() == 3 && ffn_k.dim() == 3 && att_x.dim() == 3 && proj.dim() == 3 &&
                  lora_down.dim() == 4,
              "prefill: bad ranks");
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(0) >= 1 && tokens.size(1) >= 1 && tokens.scalar_type() == at::kLong &&
                  tokens.is_cuda() && tokens.is_contiguous(),
              "prefill: tokens must be a contiguous int64 CUDA tensor [B, T], B and T >= 1");
  TORCH_CHECK(tokens.device() == emb.device(), "prefill: tokens are on another device");
  const int64_t V = emb.size(0), C = emb.size(1), L = vec.size(0), F = ffn_k.size(1), RM = lora_down.size(3);
  const int64_t B = tokens.size(0), T = tokens.size(1), BT = B * T, H = C / HEAD;
  TORCH_CHECK(L >= 1 && C % HEAD == 0 && BT * std::max(F, 6 * C) < ((int64_t)1 << 31), "prefill: needs a layer, "
              "n_embd a multiple of 64 and fewer than 2^31 elements per activation");
  check_pack(emb, head, glob, vec, proj, out, ffn_k, ffn_v, att_x, wkv, ffn_x, B, proj.size(1));
  TORCH_CHECK(proj.size(1) >= 3 * C, "prefill: proj must start with the receptance, key and value rows");
  need(lora_down, emb, {L, 4, C, RM}, true, "lora_down");
  need(lora_up, emb, {L, 4, RM, C}, true, "lora_up");

  const c10::cuda::CUDAGuard guard(emb.device());
  const cudaStream_t st = c10::cuda::getCurrentCUDAStream();
  const rnn_step::DType dt = dtype_of(emb);
  const auto f32 = emb.options().dtype(at::kFloat);
  const auto wdt = emb.options();
  at::Tensor x0 = at::empty({BT, C}, f32), x1 = at::empty({BT, C}, f32);  // residual stream, ping-pong
  at::Tensor mix = at::empty({prefill::NMIX, BT, C}, wdt);
  at::Tensor rkv = at::empty({3, BT, C}, wdt);
  at::Tensor hid = at::empty({4, BT, RM}, wdt);
  at::Tensor ups = at::empty({4, BT, C}, wdt);  // v, w, a, g
  at::Tensor vfirst = at::empty({BT, C}, f32);
  const bool wbf = prefill::wkv_bf16(dt);
  const auto wkv_opts = emb.options().dtype(wbf ? at::kBFloat16 : at::kFloat);
  at::Tensor wkv_in = at::empty({6, BT, C}, wkv_opts);
  at::Tensor bonus = at::empty({BT, H}, f32);
  at::Tensor y = at::empty({BT, C}, wkv_opts);
  at::Tensor o = at::empty({BT, C}, wdt);
  at::Tensor dx_att = at::empty({BT, C}, wdt), dx_ffn = at::empty({BT, C}, wdt);
  at::Tensor kf = at::empty({BT, F}, wdt);
  at::Tensor att_prev = att_x.clone(), ffn_prev = ffn_x.clone();  // token shift reads these, writes att_x/ffn_x
  const void* dx = nullptr;  // the last block's contribution to the residual stream, model dtype

  check(rnn_step::embed(dt, tokens.data_ptr<int64_t>(), emb.data_ptr(), glob.data_ptr<float>(), x0.data_ptr<float>(),
                        (int)BT, (int)C, (int)V, st), "embed");
  const int64_t nvec = rnn_step::NVEC * C, sz = (int64_t)B * H * HEAD * HEAD;
  char* wi = static_cast<char*>(wkv_in.data_ptr());
  const int64_t seq_bytes = BT * C * (int64_t)wkv_in.element_size();  // one of the six WKV inputs
  for (int64_t l = 0; l < L; ++l) {
    const float* lvec = vec.data_ptr<float>() + l * nvec;
    // Time mix. The residual stream so far is x0 (+ dx); x1 receives their sum.
    prefill::LnMix lm;
    lm.x_in = x0.data_ptr<float>(), lm.dx = dx, lm.x_out = dx != nullptr ? x1.data_ptr<float>() : nullptr;
    lm.w = lvec + rnn_step::LN1_W * C, lm.b = lvec + rnn_step::LN1_B * C;
    lm.prev = att_prev[l].data_ptr(), lm.last = att_x[l].data_ptr(), lm.vec = lvec;
    const int rows6[prefill::NMIX] = {rnn_step::X_R, rnn_step::X_K, rnn_step::X_V, rnn_step::X_W, rnn_step::X_A,
                                      rnn_step::X_G};
    for (int m = 0; m < prefill::NMIX; ++m) lm.rows[m] = rows6[m];
    lm.nmix = prefill::NMIX, lm.mix = mix.data_ptr(), lm.B = (int)B, lm.T = (int)T, lm.C = (int)C;
    check(prefill::ln_mix(dt, lm, st), "ln_mix");
    if (dx != nullptr) std::swap(x0, x1);

    at::bmm_out(rkv, mix.narrow(0, prefill::MIX_R, 3), proj[l].narrow(0, 0, 3 * C).view({3, C, C}).transpose(1, 2));
    at::bmm_out(hid, mix.narrow(0, prefill::MIX_V, 4), lora_down[l]);
    check(prefill::lora_act(dt, hid.data_ptr(), BT * RM, st), "lora_act");
    at::bmm_out(ups, hid, lora_up[l]);

    prefill::Gates ga;
    ga.rkv = rkv.data_ptr(), ga.vup = ups[0].data_ptr(), ga.wup = ups[1].data_ptr(), ga.aup = ups[2].data_ptr();
    ga.vfirst = vfirst.data_ptr<float>(), ga.vec = lvec, ga.wkv_in = wi;
    ga.bonus = bonus.data_ptr<float>(), ga.rows = (int)BT, ga.C = (int)C, ga.first_layer = l == 0;
    check(prefill::gates(dt, ga, st), "gates");

    // In place (s0 == sT): each thread of the forward kernel reads its elements of the state before the time loop
    // and writes the same elements once after it; no other thread touches them (see fwd_kernel).
    float* s_l = wkv.data_ptr<float>() + l * sz;
    wkv7::Args wa;
    wa.B = (int)B, wa.T = (int)T, wa.H = (int)H;
    wa.r = wi, wa.w = wi + seq_bytes, wa.k = wi + 2 * seq_bytes, wa.v = wi + 3 * seq_bytes;
    wa.a = wi + 4 * seq_bytes, wa.b = wi + 5 * seq_bytes, wa.s0 = s_l, wa.y = y.data_ptr(), wa.sT = s_l;
    check(wkv7::forward(wbf ? wkv7::DType::BF16 : wkv7::DType::F32, (int)wkv_cfg, false, wa, st), "the WKV forward");

    check(prefill::out_norm(dt, y.data_ptr(), bonus.data_ptr<float>(), wi + 3 * seq_bytes, ups[3].data_ptr(),
                            lvec, o.data_ptr(), (int)BT, (int)C, st), "out_norm");
    at::mm_out(dx_att, o, out[l].t());

    // Channel mix.
    prefill::LnMix lf;
    lf.x_in = x0.data_ptr<float>(), lf.dx = dx_att.data_ptr(), lf.x_out = x1.data_ptr<float>();
    lf.w = lvec + rnn_step::LN2_W * C, lf.b = lvec + rnn_step::LN2_B * C;
    lf.prev = ffn_prev[l].data_ptr(), lf.last = ffn_x[l].data_ptr(), lf.vec = lvec;
    lf.rows[0] = rnn_step::FFN_XK, lf.nmix = 1, lf.mix = mix.data_ptr(), lf.B = (int)B, lf.T = (int)T, lf.C = (int)C;
    check(prefill::ln_mix(dt, lf, st), "ln_mix");
    std::swap(x0, x1);
    at::mm_out(kf, mix[0], ffn_k[l].t());
    check(prefill::relu_sq(dt, kf.data_ptr(), kf.numel(), st), "relu_sq");
    at::mm_out(dx_ffn, kf, ffn_v[l].t());
    dx = dx_ffn.data_ptr();
  }
  at::Tensor hlast = at::empty({B, C}, f32);
  check(prefill::last_ln(dt, x0.data_ptr<float>(), dx, glob.data_ptr<float>(), hlast.data_ptr<float>(), (int)B, (int)T,
                         (int)C, st), "last_ln");
  return at::mm(hlast, head.to(at::kFloat).t());  // fp32 logits, as the fused step makes them
}

}  // namespace

void bind_rnn_step(pybind11::module_& m) {
  m.def("rnn_step", &rnn_step_forward, "fused RNN-mode step of the whole model (one token per sequence)");
  m.def("rnn_prefill", &prefill_forward, "fused parallel forward over a prompt, state in and out, last logits");
  m.def("rnn_step_nvec", []() { return (int64_t)rnn_step::NVEC; }, "rows of the per-layer vector table");
}
