"""What the compiled training step keeps for backward, by op and source line: an estimate made on the CPU.

    python bench/saved_activations.py                                  # base preset, B16 T2048, every recompute mode
    python bench/saved_activations.py --recompute none --weights bf16 --top 20

torch.compile's partitioner decides which forward values the backward gets (saved) and which it computes again;
their bytes are most of a step's peak memory. This traces the model's training forward under AOTAutograd with
that partitioner (inductor's min-cut, the activation memory budget, the model's `recompute` tags) and lists
the forward graph's saved outputs, with no GPU: the CUDA WKV op is traced through its fake implementation and
the step stops before anything runs. Two short traces (B 2, T 96 and 192) give each saved tensor's bytes per
token, extrapolated to --batch x --seq.

It is an estimate: CPU autocast casts a few ops differently from CUDA autocast (CUDA runs pow in fp32, for
one), parameters and optimizer state are not counted, nor the transient buffers of the backward, and inductor
may still fuse away a saved value. Check the figures on a GPU (`bench/train_step.py` prints the peak).
"""

from __future__ import annotations

import argparse
import collections
import functools
import math
import operator

import torch
import torch._functorch.config as functorch_config
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition

from rwkv_music.model import RWKV7, from_preset, wkv_cuda
from rwkv_music.model.recompute import RECOMPUTE
from rwkv_music.model.wkv import WkvBackend

_VIEWS = {"aten.view.default", "aten.t.default", "aten.detach.default", "aten._unsafe_view.default",
          "aten.permute.default", "aten.reshape.default", "aten.expand.default", "aten.slice.Tensor",
          "aten.unsqueeze.default", "aten.squeeze.dim", "aten.alias.default", "aten.transpose.int"}


class _Traced(Exception):
    """Raised by the forward compiler once it has seen the graph: nothing needs to run."""


def _op_name(node) -> str:
    """aten.mm.default -> mm; the i-th output of a multi-output op (the WKV kernel's) -> op[i]."""
    if node.target is operator.getitem:
        return f"{_op_name(node.args[0])}[{node.args[1]}]"
    return str(node.target).removeprefix("aten.").removesuffix(".default").removeprefix("rwkv_music.")


def _source(node) -> str:
    """The model's source line that made `node` (from the stack trace dynamo records)."""
    lines = [ln.strip() for ln in (node.meta.get("stack_trace") or "").splitlines()]
    code = [ln for ln in lines if ln and not ln.startswith("File") and set(ln) - set("^~ ")]
    return code[-1] if code else "(input)"


def saved_values(preset: str, vocab: int, B: int, T: int, recompute: str, bf16_weights: bool,
                 budget: float) -> list[tuple[str, str, torch.dtype, int]]:
    """(op, source line, dtype, bytes) of each distinct tensor the forward graph saves for backward."""
    torch._dynamo.reset()
    functorch_config.activation_memory_budget = budget
    torch.manual_seed(0)
    model = RWKV7(from_preset(preset, vocab))
    if bf16_weights:
        model = model.bfloat16()
    model.recompute = recompute
    # the CUDA kernel's op, traced through its fake implementation (the config argument avoids asking a GPU)
    model._backends[(model.wkv_backend, torch.device("cpu"))] = WkvBackend(
        "cuda", functools.partial(wkv_cuda.wkv_cuda, cfg=(1, 1, 6)), None)
    found: list[tuple[str, str, torch.dtype, int]] = []

    def forward_compiler(gm, _inputs):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        seen = set()
        for arg in out.args[0][1:]:  # the first output is the logits, the rest is saved for backward
            val = getattr(arg, "meta", {}).get("val")
            if not isinstance(val, torch.Tensor):
                continue
            base = arg
            while base.op == "call_function" and str(base.target) in _VIEWS:
                base = base.args[0]
            if base in seen or base.op == "placeholder":  # views of one tensor count once; inputs are not new
                continue
            seen.add(base)
            t = base.meta["val"]
            found.append((_op_name(base), _source(base), t.dtype, t.numel() * t.element_size()))
        raise _Traced

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: gm,
                           partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"))
    idx = torch.randint(0, vocab, (B, T))
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, -(T // 3):] = True
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not bf16_weights):
            torch.compile(model, backend=backend)(idx, positions=mask)
    except Exception as e:  # dynamo wraps what the compiler raised
        if not isinstance(e, _Traced) and "_Traced" not in repr(e):
            raise
    functorch_config.activation_memory_budget = 1.0
    return found


def estimate(args, recompute: str, weights: str) -> tuple[float, list]:
    """Saved GiB at --batch x --seq, and the rows by (op, source, dtype)."""
    B, t1, t2 = 2, 96, 192
    a = saved_values(args.preset, args.vocab, B, t1, recompute, weights == "bf16", args.budget)
    b = saved_values(args.preset, args.vocab, B, t2, recompute, weights == "bf16", args.budget)
    if [x[:3] for x in a] != [x[:3] for x in b]:
        raise SystemExit("the two traces saved different values; try other lengths")
    rows: dict[tuple, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for (op, src, dt, n1), (_, _, _, n2) in zip(a, b, strict=True):
        per_token = (n2 - n1) / (B * (t2 - t1))
        size = per_token * args.batch * args.seq + (n1 - per_token * B * t1)
        row = rows[(op, src, str(dt).removeprefix("torch."))]
        row[0] += 1
        row[1] += size
    total = sum(r[1] for r in rows.values())
    return total / 2**30, sorted(((v[1] / 2**30, v[0], *k) for k, v in rows.items()), reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--vocab", type=int, default=470)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--recompute", nargs="+", choices=RECOMPUTE, default=["none", "elementwise"])
    ap.add_argument("--weights", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                    help="fp32 weights under bf16 autocast, or bf16 weights (fit --precision bf16-weights)")
    ap.add_argument("--budget", type=float, default=1.0, help="AOTAutograd's activation memory budget (0..1).")
    ap.add_argument("--top", type=int, default=12, help="Rows per case (0: totals only).")
    args = ap.parse_args()
    print(f"saved for backward, estimated: {args.preset} preset, B{args.batch} T{args.seq}, budget {args.budget:g}")
    for weights in args.weights:
        for recompute in args.recompute:
            total, rows = estimate(args, recompute, weights)
            print(f"\n## weights {weights}, recompute {recompute}: {total:.2f} GiB")
            for gib, count, op, src, dt in rows[: args.top]:
                if math.isfinite(gib):
                    print(f"{gib:7.3f} GiB  x{count:<3d} {op:22s} {dt:9s} {src[:80]}")


if __name__ == "__main__":
    main()
