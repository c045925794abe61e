"""RWKV-7 (x070) language model, as in BlinkDL's RWKV-LM, in plain PyTorch.

Parameter names and shapes equal RWKV-LM's state-dict keys (``blocks.0.att.r_k``, ``emb.weight``, ...),
so checkpoints convert by name. One difference: layer 0 has no ``v0/v1/v2`` (RWKV-LM creates them but
never uses them); `checkpoint.save_rwkv_lm` writes placeholders for them.

Shapes: B batch, T time, C = n_embd, H heads of N = head_size channels, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rwkv_music.model.config import RWKV7Config
from rwkv_music.model.recompute import run_block
from rwkv_music.model.state import RWKV7State
from rwkv_music.model.wkv import WkvBackend, default_backend, resolve_backend, wkv

_MIX_EXPONENTS = {"x_r": 0.2, "x_w": 0.9, "x_k": 0.7, "x_v": 0.7, "x_a": 0.9, "x_g": 0.2}


@torch.compiler.disable
def _wkv_torch_outside_compile(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                               state: Tensor | None, starts: Tensor | None,
                               backend: WkvBackend) -> tuple[Tensor, Tensor]:
    """The chunked PyTorch WKV, left out of torch.compile's graphs.

    Traced, its loop over ceil(T / chunk) chunks is unrolled and guarded on the chunk count, so batches of
    varying length recompiled until dynamo's recompile limit sent the model back to eager. Fixed strides
    for y (its reshape copied anyway) keep T % chunk from causing another recompile.
    """
    y, s = wkv(r, w, k, v, a, b, state=state, starts=starts, backend=backend)
    return y.flatten(2).contiguous(), s


def _wkv_heads(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None,
               starts: Tensor | None, backend: WkvBackend) -> tuple[Tensor, Tensor]:
    """WKV on [B, T, H, N] heads, y back as [B, T, C]. The CUDA and Triton backends are torch custom ops, which
    torch.compile keeps inside its graph (no break between the gates before and the norm after)."""
    if backend.name in ("cuda", "triton"):
        y, s = wkv(r, w, k, v, a, b, state=state, starts=starts, backend=backend)
        return y.flatten(2), s
    return _wkv_torch_outside_compile(r, w, k, v, a, b, state, starts, backend)


def _ortho_lora_(p: Tensor, scale: float) -> None:
    """RWKV-LM's ortho_init for LoRA up-projections: orthogonal, gain scaled for tall matrices."""
    rows, cols = p.shape
    gain = math.sqrt(rows / cols) if rows > cols else 1.0
    nn.init.orthogonal_(p, gain=gain * scale)


def _shift(x: Tensor, x_prev: Tensor | None, starts: Tensor | None = None) -> Tensor:
    """Token shift: the previous token's vector at every position (x_prev or zeros before the first, and
    zeros where a packed sequence starts)."""
    first = torch.zeros_like(x[:, :1]) if x_prev is None else x_prev[:, None].to(x.dtype)
    shifted = torch.cat([first, x[:, :-1]], dim=1)
    if starts is not None:
        shifted = shifted.masked_fill(starts[..., None], 0.0)
    return shifted


class TimeMix(nn.Module):
    """x070 time mixing: six token-shift lerps, LoRA-made decay / in-context rate / gate, WKV, bonus."""

    def __init__(self, cfg: RWKV7Config, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_layer = cfg.n_layer
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.n_head, self.head_size = H, N
        for name in _MIX_EXPONENTS:
            setattr(self, name, nn.Parameter(torch.empty(1, 1, C)))
        self.w0 = nn.Parameter(torch.empty(1, 1, C))
        self.w1 = nn.Parameter(torch.empty(C, cfg.d_decay_lora))
        self.w2 = nn.Parameter(torch.empty(cfg.d_decay_lora, C))
        self.a0 = nn.Parameter(torch.empty(1, 1, C))
        self.a1 = nn.Parameter(torch.empty(C, cfg.d_aaa_lora))
        self.a2 = nn.Parameter(torch.empty(cfg.d_aaa_lora, C))
        if layer_id > 0:  # value residual toward layer 0's v (layer 0 supplies v_first)
            self.v0 = nn.Parameter(torch.empty(1, 1, C))
            self.v1 = nn.Parameter(torch.empty(C, cfg.d_mv_lora))
            self.v2 = nn.Parameter(torch.empty(cfg.d_mv_lora, C))
        self.g1 = nn.Parameter(torch.empty(C, cfg.d_gate_lora))
        self.g2 = nn.Parameter(torch.empty(cfg.d_gate_lora, C))
        self.k_k = nn.Parameter(torch.empty(1, 1, C))
        self.k_a = nn.Parameter(torch.empty(1, 1, C))
        self.r_k = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """RWKV-LM x070 init (module init plus generate_init_weight's overrides)."""
        C, N = self.w0.shape[-1], self.head_size
        n_layer, layer = self.n_layer, self.layer_id
        ratio_0_to_1 = layer / max(n_layer - 1, 1)
        ratio_1_to_almost0 = 1.0 - layer / n_layer
        ddd = torch.arange(C, dtype=torch.float32) / C
        for name, e in _MIX_EXPONENTS.items():
            getattr(self, name).copy_((1.0 - ddd.pow(e * ratio_1_to_almost0)).view(1, 1, C))
        n = torch.arange(C, dtype=torch.float32)
        linear = n / (C - 1) - 0.5
        zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / (C - 1)) ** (1 + ratio_0_to_1**0.3)
        self.w0.copy_((www + 0.5 + zigzag * 2.5).view(1, 1, C))
        self.a0.copy_((-0.19 + zigzag * 0.3 + linear * 0.4).view(1, 1, C))
        self.k_k.copy_((0.71 - linear * 0.1).view(1, 1, C))
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        for down, up in (("w1", "w2"), ("a1", "a2"), ("v1", "v2"), ("g1", "g2")):
            if hasattr(self, down):
                getattr(self, down).zero_()
                _ortho_lora_(getattr(self, up), 0.1)
        if hasattr(self, "v0"):
            self.v0.copy_((0.73 - linear * 0.4).view(1, 1, C))
        nn.init.orthogonal_(self.receptance.weight, gain=1.0)
        nn.init.orthogonal_(self.key.weight, gain=0.1)
        nn.init.orthogonal_(self.value.weight, gain=1.0)
        self.output.weight.zero_()
        self.ln_x.weight.fill_(((1 + layer) / n_layer) ** 0.7)
        self.ln_x.bias.zero_()

    def forward(
        self, x: Tensor, v_first: Tensor | None, x_prev: Tensor | None, state: Tensor | None,
        starts: Tensor | None, backend: WkvBackend,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x: [B, T, C] (ln1 output). Returns (out, v_first, last x for token shift, WKV state)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = _shift(x, x_prev, starts) - x
        # x + xx * mix, written as addcmul: one op that model/recompute.py's policies can single out
        xr, xw, xk = (torch.addcmul(x, xx, m) for m in (self.x_r, self.x_w, self.x_k))
        xv, xa, xg = (torch.addcmul(x, xx, m) for m in (self.x_v, self.x_a, self.x_g))

        r = self.receptance(xr)
        w = self.w0 + torch.tanh(xw @ self.w1) @ self.w2  # raw decay logit; decay = exp(-e^-0.5 sigmoid(w))
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:
            assert v_first is not None
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (a - 1) * self.k_a)

        dt = r.dtype
        heads = [t.to(dt).reshape(B, T, H, N) for t in (r, w, k, v, -kk, kk * a)]
        y, state = _wkv_heads(*heads, state, starts, backend)

        y = self.ln_x(y.view(B * T, C)).view(B, T, C)
        bonus = (r.view(B, T, H, N) * k.view(B, T, H, N) * self.r_k).sum(dim=-1, keepdim=True)
        y = y + (bonus * v.view(B, T, H, N)).view(B, T, C)
        return self.output(y * g), v_first, x[:, -1], state


class _ReluSquare(torch.autograd.Function):
    """relu(x)^2 that saves only its output for backward. The value product keeps that output anyway, and the
    derivative 2 relu(x) = 2 sqrt(y) follows from it, so the [B, T, 4C] pre-activation need not be kept too."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = torch.relu(x) ** 2
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # sqrt's own derivative is infinite at y = 0
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return grad * 2 * y.sqrt()


class ChannelMix(nn.Module):
    """x070 channel mixing: token-shift lerp, then relu(.)^2 MLP."""

    def __init__(self, cfg: RWKV7Config, layer_id: int) -> None:
        super().__init__()
        self.layer_id, self.n_layer = layer_id, cfg.n_layer
        C = cfg.n_embd
        self.x_k = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, C, bias=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        C = self.x_k.shape[-1]
        ratio_1_to_almost0 = 1.0 - self.layer_id / self.n_layer
        ddd = torch.arange(C, dtype=torch.float32) / C
        self.x_k.copy_((1.0 - ddd.pow(ratio_1_to_almost0**4)).view(1, 1, C))
        nn.init.orthogonal_(self.key.weight, gain=1.0)
        self.value.weight.zero_()

    def forward(self, x: Tensor, x_prev: Tensor | None, starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
        xx = _shift(x, x_prev, starts) - x
        k = _ReluSquare.apply(self.key(torch.addcmul(x, xx, self.x_k)))
        return self.value(k), x[:, -1]


class Block(nn.Module):
    """Pre-LN residual block (ln0 on the embedding in layer 0 only)."""

    def __init__(self, cfg: RWKV7Config, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(
        self,
        x: Tensor,
        v_first: Tensor | None,
        att_x: Tensor | None,
        wkv_state: Tensor | None,
        ffn_x: Tensor | None,
        starts: Tensor | None,
        backend: WkvBackend,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        if self.layer_id == 0:
            x = self.ln0(x)
        dx, v_first, att_x, wkv_state = self.att(self.ln1(x), v_first, att_x, wkv_state, starts, backend)
        x = x + dx
        dx, ffn_x = self.ffn(self.ln2(x), ffn_x, starts)
        return x + dx, v_first, att_x, wkv_state, ffn_x


class RWKV7(nn.Module):
    """The RWKV-7 model: embedding, blocks, final LayerNorm, LM head.

    Call conventions (idx: LongTensor [B, T]):
      ``model(idx)``                                -> logits [B, T, V]
      ``model(idx, positions=mask)``                -> logits [n_selected, V]  (mask: bool [B, T])
      ``model(idx, flat_positions=i)``              -> logits [N, V], the rows i (long [N]) of the [B * T]
                                                       positions: a mask's rows found on the host, so
                                                       selecting them needs no device sync (training)
      ``model(idx, positions=pos)``                 -> logits [B, V] for pos: long [B],
                                                       [B, K, V] for pos: long [B, K]
      ``model(idx, state, ..., return_state=True)`` -> (logits, RWKV7State)
      ``model.step(tokens, state)``                 -> (logits [B, V], RWKV7State)   RNN mode
    ``state=None`` means the zero state. The LM head runs only on selected positions, so training with
    a completion mask never materialises [B, T, V]. ``starts`` (bool [B, T]) packs several sequences into
    one row: at each marked position token shift and WKV state restart from zero.

    Runtime switches (not part of the saved config): ``recompute`` (none | elementwise | blocks, see
    `model/recompute.py`) trades backward time for activation memory (``grad_checkpoint = True`` is "blocks");
    ``wkv_backend`` (auto | torch | cuda | triton) picks the WKV implementation, resolved once per device.
    """

    def __init__(self, cfg: RWKV7Config, init_weights: bool = True) -> None:
        """``init_weights=False`` leaves parameters uninitialised (for loaders that overwrite them)."""
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.recompute = "none"
        self.wkv_backend = default_backend()
        self._backends: dict[tuple[str, torch.device], WkvBackend] = {}
        if init_weights:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """RWKV-LM's x070 initialisation (uses the global torch RNG: seed it for reproducibility)."""
        for m in self.modules():
            if isinstance(m, nn.LayerNorm | TimeMix | ChannelMix):
                m.reset_parameters()
        self.reset_vocab_parameters()

    @torch.no_grad()
    def reset_vocab_parameters(self, start: int = 0) -> None:
        """(Re-)initialise embedding and head rows from ``start`` on, as RWKV-LM does."""
        V, C = self.cfg.vocab_size, self.cfg.n_embd
        nn.init.uniform_(self.emb.weight[start:], -1e-4, 1e-4)
        gain = 0.5 * math.sqrt(V / C) if V > C else 0.5
        head = torch.empty(V, C)
        nn.init.orthogonal_(head, gain=gain)
        self.head.weight[start:] = head[start:].to(self.head.weight)

    @property
    def grad_checkpoint(self) -> bool:
        return self.recompute == "blocks"

    @grad_checkpoint.setter
    def grad_checkpoint(self, on: bool) -> None:
        self.recompute = "blocks" if on else "none"

    @property
    def device(self) -> torch.device:
        return self.emb.weight.device

    @torch.compiler.disable
    def backend(self, device: torch.device) -> WkvBackend:
        """The WKV implementation for `device`, resolved on first use (one warning if CUDA falls back)."""
        key = (self.wkv_backend, device)
        if key not in self._backends:
            self._backends[key] = resolve_backend(self.wkv_backend, device)
        return self._backends[key]

    def hidden(
        self, idx: Tensor, state: RWKV7State | None = None, return_state: bool = False,
        starts: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, RWKV7State]:
        """Final hidden states after ln_out, [B, T, C] (apply ``model.head`` for logits)."""
        if starts is not None and starts.shape != idx.shape:
            raise ValueError(f"starts shape {tuple(starts.shape)} != idx shape {tuple(idx.shape)}")
        backend = self.backend(idx.device)
        x = self.emb(idx)
        v_first: Tensor | None = None
        att_xs, wkvs, ffn_xs = [], [], []
        recompute = self.recompute if self.training and torch.is_grad_enabled() else "none"
        for i, block in enumerate(self.blocks):
            layer_state = (None, None, None) if state is None else (state.att_x[i], state.wkv[i], state.ffn_x[i])
            x, v_first, att_x, s, ffn_x = run_block(block, recompute, x, v_first, *layer_state, starts, backend)
            att_xs.append(att_x)
            wkvs.append(s)
            ffn_xs.append(ffn_x)
        h = self.ln_out(x)
        if not return_state:
            return h
        return h, RWKV7State(torch.stack(att_xs), torch.stack(wkvs), torch.stack(ffn_xs))

    @staticmethod
    def select(h: Tensor, positions: Tensor | None) -> Tensor:
        """Rows of h [B, T, C] chosen by ``positions`` (bool [B, T], long [B] or long [B, K])."""
        if positions is None:
            return h
        if positions.dtype == torch.bool:
            if positions.shape != h.shape[:2]:
                raise ValueError(f"mask shape {tuple(positions.shape)} != [B, T] {tuple(h.shape[:2])}")
            return h[positions]
        if positions.dim() == 1:
            return h[torch.arange(h.shape[0], device=h.device), positions]
        if positions.dim() == 2:
            return torch.gather(h, 1, positions[..., None].expand(-1, -1, h.shape[-1]))
        raise ValueError("positions must be a bool [B, T] mask or a long [B] / [B, K] index tensor")

    def forward(
        self,
        idx: Tensor,
        state: RWKV7State | None = None,
        positions: Tensor | None = None,
        return_state: bool = False,
        starts: Tensor | None = None,
        flat_positions: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, RWKV7State]:
        """Parallel mode. Returns logits (see the class docstring), or (logits, state) if return_state."""
        if flat_positions is not None and positions is not None:
            raise ValueError("give positions or flat_positions, not both")
        out = self.hidden(idx, state, return_state=return_state, starts=starts)
        h, new_state = out if return_state else (out, None)
        h = (self.select(h, positions) if flat_positions is None
             else h.flatten(0, 1).index_select(0, flat_positions))
        return (self.head(h), new_state) if return_state else self.head(h)

    def step(self, tokens: Tensor, state: RWKV7State | None) -> tuple[Tensor, RWKV7State]:
        """RNN mode: one token per row (tokens: long [B]). O(1) in the sequence length."""
        logits, new_state = self.forward(tokens[:, None], state, return_state=True)
        return logits[:, 0], new_state

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
