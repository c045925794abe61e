"""The RNN-mode step (decoding) and the prefill as fused CUDA kernels.

At batch 1 the readable `RWKV7.step` is bound by kernel launches: its math is a few small matrix-vector
products per layer, but each lerp, gate and norm is its own kernel. `FastStep` runs the same function with
the weights packed once into the layout of `model/cuda/rnn_step_kernels.cu` (which lists the seven
kernels): a copy of the weights in the model's dtype. Its residual stream, state and sums are fp32, so in bf16 or
fp16 its logits stay about as close to a float32 run of the readable model as the readable model in that dtype does;
`tests/gpu/test_fast_step.py` states the tolerances. With bf16 weights (what `complete` runs on CUDA) on sm_80 or
later its matrix products run on tensor cores, inputs rounded to bf16 as the readable model's are: `complete`
decodes a sample's 16 candidates as 16 rows, which on the CUDA cores cost twice one row (docs/benchmarks.md,
"the products on tensor cores").

`FastStep.prefill` runs the parallel forward over a prompt from the same pack, as 13 launches per layer
(`model/cuda/prefill_kernels.cu`, cuBLAS products, the WKV forward kernel) where the readable forward issues
~60: at batch 1 that forward is bound by launches, not by the GPU. Its matrix products, lerps and WKV inputs are
in the weights' dtype, as the readable model runs them (fp32 WKV for fp16 weights); the residual stream, the
state and the element-wise math are fp32.

The pack is a snapshot of the weights: `FastStep.for_model` keeps one per model and packs again when a
parameter has changed (new tensor or in-place update) since. The state is updated in place, so a decode loop
over fixed state tensors can be captured as a CUDA graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkv_music.model import wkv_cuda
from rwkv_music.model.state import RWKV7State
from rwkv_music.model.wkv_cuda import default_config

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported_reason(model) -> str | None:
    """Why `FastStep` cannot run `model` where it is, or None when it can."""
    cfg = model.cfg
    if model.device.type != "cuda":
        return "the fused step needs a CUDA device"
    if cfg.head_size != wkv_cuda.HEAD_SIZE:
        return f"the fused step needs head_size {wkv_cuda.HEAD_SIZE}, the model has {cfg.head_size}"
    lora = cfg.d_decay_lora + cfg.d_aaa_lora + cfg.d_mv_lora + cfg.d_gate_lora
    if cfg.dim_ffn % 8 != 0 or cfg.n_embd > 8192 or lora > 8192:
        return "the fused step needs dim_ffn a multiple of 8, n_embd <= 8192 and the LoRA ranks <= 8192 together"
    if model.emb.weight.dtype not in _DTYPES:
        return f"the fused step has no kernels for {model.emb.weight.dtype}"
    if not wkv_cuda.is_available():
        return f"the CUDA extension is not available ({wkv_cuda.load_error()})"
    return None


def _weights_key(model) -> tuple:
    """Changes whenever a parameter is replaced (new storage, dtype, device) or updated in place (its version)."""
    return tuple((p.data_ptr(), p.dtype, p._version) for p in model.parameters())


class FastStep:
    """``FastStep(model)(tokens, state) -> logits``: one token per row (tokens: long [B]), state updated in place,
    logits float32 [B, V]. The state's att_x / ffn_x must be in the model's dtype (as the model's own forward
    returns them)."""

    _CACHE_ATTR = "_fast_step_cache"

    @classmethod
    def for_model(cls, model) -> FastStep:
        """The model's packed step, packed again if any parameter changed since (a generate call per eval window
        then costs no copy of the weights)."""
        key = _weights_key(model)
        cached = getattr(model, cls._CACHE_ATTR, None)
        if cached is None or cached[0] != key:
            cached = (key, cls(model))
            object.__setattr__(model, cls._CACHE_ATTR, cached)  # a plain attribute, not a submodule or buffer
        return cached[1]

    def __init__(self, model, tensor_cores: bool = True) -> None:
        """`tensor_cores`: bf16 weights' products on tensor cores (bf16 inputs, fp32 sums); False keeps them on the
        CUDA cores with fp32 inputs (for comparisons). Other dtypes, and GPUs before sm_80, always use the CUDA
        cores; `self.tensor_cores` says which runs."""
        reason = unsupported_reason(model)
        if reason is not None:
            raise RuntimeError(reason)
        self.tensor_cores = (bool(tensor_cores) and model.emb.weight.dtype == torch.bfloat16
                             and torch.cuda.get_device_capability(model.device)[0] >= 8)
        self.device = model.device  # the extension is looked up per call: a module object would not deepcopy
        self.dtype = model.emb.weight.dtype
        self.n_layer = model.cfg.n_layer
        cfg = model.cfg
        self.cfg = cfg
        self.lora = [cfg.d_decay_lora, cfg.d_aaa_lora, cfg.d_mv_lora, cfg.d_gate_lora]
        with torch.no_grad():
            self._pack(model)

    @property
    def _ext(self):
        return wkv_cuda._ext(self.device)

    def _pack(self, model) -> None:
        C, dv, dt = model.cfg.n_embd, model.cfg.d_mv_lora, self.dtype
        vecs, proj, up, out, ffn_k, ffn_v, downs, ups = [], [], [], [], [], [], [], []
        rm = -(-max(self.lora) // 8) * 8  # the prefill's one LoRA rank, padded with zeros
        for blk in model.blocks:
            att, ffn = blk.att, blk.ffn
            first = blk.layer_id == 0
            v0 = torch.zeros_like(att.w0) if first else att.v0
            rows = [blk.ln1.weight, blk.ln1.bias, blk.ln2.weight, blk.ln2.bias,
                    att.x_r, att.x_w, att.x_k, att.x_v, att.x_a, att.x_g,
                    att.w0, att.a0, v0, att.k_k, att.k_a, att.r_k, att.ln_x.weight, att.ln_x.bias, ffn.x_k]
            vecs.append(torch.stack([r.reshape(C).float() for r in rows]))
            v1 = att.w1.new_zeros(C, dv) if first else att.v1
            v2 = att.w2.new_zeros(dv, C) if first else att.v2
            proj.append(torch.cat([att.receptance.weight, att.key.weight, att.value.weight,
                                   att.w1.t(), att.a1.t(), v1.t(), att.g1.t()]).to(dt))
            up.append(torch.cat([att.w2, att.a2, v2, att.g2]).to(dt))
            down_l, up_l = att.w1.new_zeros(4, C, rm, dtype=dt), att.w2.new_zeros(4, rm, C, dtype=dt)
            for slot, (d, u) in enumerate(((v1, v2), (att.w1, att.w2), (att.a1, att.a2), (att.g1, att.g2))):
                down_l[slot, :, : d.shape[1]] = d  # [C, rank]: x @ down
                up_l[slot, : u.shape[0]] = u
            downs.append(down_l)
            ups.append(up_l)
            out.append(att.output.weight.to(dt))
            ffn_k.append(ffn.key.weight.to(dt))
            ffn_v.append(ffn.value.weight.to(dt))
        b0 = model.blocks[0]
        self.glob = torch.stack([b0.ln0.weight, b0.ln0.bias, model.ln_out.weight, model.ln_out.bias]).float()
        self.vec = torch.stack(vecs).contiguous()
        if self.vec.shape[1] != self._ext.rnn_step_nvec():
            raise RuntimeError("rnn_step: the vector table does not match the kernels' layout")
        self.proj, self.up, self.out = (torch.stack(x).contiguous() for x in (proj, up, out))
        self.ffn_k, self.ffn_v = torch.stack(ffn_k).contiguous(), torch.stack(ffn_v).contiguous()
        self.lora_down, self.lora_up = torch.stack(downs).contiguous(), torch.stack(ups).contiguous()
        self.emb = model.emb.weight.detach().to(dt, copy=True).contiguous()
        self.head = model.head.weight.detach().to(dt, copy=True).contiguous()

    def __call__(self, tokens: Tensor, state: RWKV7State) -> Tensor:
        """Logits [B, V] float32 for `tokens` (long [B], each < V: a token out of range gives NaN logits). The
        kernels write the new state into `state`'s own tensors (so they must be contiguous), which keeps a
        captured CUDA graph's buffers fixed."""
        if state.n_layer != self.n_layer or state.att_x.dtype != self.dtype:
            raise ValueError(f"state must have {self.n_layer} layers and att_x/ffn_x in {self.dtype}, got "
                             f"{state.n_layer} layers in {state.att_x.dtype}")
        return self._ext.rnn_step(tokens.contiguous(), self.emb, self.head, self.glob, self.vec, self.proj, self.up,
                                  self.out, self.ffn_k, self.ffn_v, state.att_x, state.wkv, state.ffn_x, self.lora,
                                  self.tensor_cores)

    def zero_state(self, batch_size: int) -> RWKV7State:
        """The state before any token, in the layout `__call__` and `prefill` update in place."""
        return RWKV7State.zeros(self.cfg, batch_size, self.device, self.dtype)

    def prefill(self, tokens: Tensor, state: RWKV7State | None = None,
                wkv_config: int | None = None) -> tuple[Tensor, RWKV7State]:
        """The parallel forward over `tokens` (long [B, T]) from `state` (None: zeros), for the logits of each row's
        last token (float32 [B, V]) and the state after it. A given state is updated in place (contiguous, att_x /
        ffn_x in the model's dtype); a token out of range gives NaN logits. `wkv_config`: the WKV forward's launch
        configuration (default: `wkv_cuda.default_config`'s; others are for benchmarks)."""
        if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
            raise ValueError(f"prefill needs tokens [B, T] with B, T >= 1, got shape {tuple(tokens.shape)}")
        B = tokens.shape[0]
        if state is None:
            state = self.zero_state(B)
        elif state.n_layer != self.n_layer or state.att_x.dtype != self.dtype or state.batch_size != B:
            raise ValueError(f"state must have {self.n_layer} layers, batch {B} and att_x/ffn_x in {self.dtype}, got "
                             f"{state.n_layer} layers, batch {state.batch_size} in {state.att_x.dtype}")
        cfg = default_config(B, self.cfg.n_head, self.device)[0] if wkv_config is None else wkv_config
        logits = self._ext.rnn_prefill(tokens.to(self.device, torch.long).contiguous(), self.emb, self.head, self.glob,
                                       self.vec, self.proj, self.lora_down, self.lora_up, self.out, self.ffn_k,
                                       self.ffn_v, state.att_x, state.wkv, state.ffn_x, cfg)
        return logits, state
