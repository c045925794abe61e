"""Run BlinkDL's `rwkv` package (x070, cpu fp32) on a checkpoint; used by the tests in a subprocess.

Usage: python rwkv_pip_ref.py CHECKPOINT.pth PROMPT_IDS(comma-separated) STEP_IDS(comma-separated) OUT.pt
Writes {"seq": logits [T, V] of the prompt, "steps": logits [S, V] of the following RNN steps}.
The environment variables must be set before `rwkv.model` is imported, hence the separate process.
"""

import os
import sys

os.environ["RWKV_V7_ON"] = "1"
os.environ["RWKV_JIT_ON"] = "1"
os.environ["RWKV_CUDA_ON"] = "0"

import torch
from rwkv.model import RWKV


def main() -> None:
    ckpt, prompt, steps, out = sys.argv[1:5]
    assert ckpt.endswith(".pth")
    prompt_ids = [int(t) for t in prompt.split(",")]
    step_ids = [int(t) for t in steps.split(",")] if steps else []
    model = RWKV(model=ckpt[: -len(".pth")], strategy="cpu fp32")
    seq, state = model.forward(prompt_ids, None, full_output=True)
    seq = seq.clone()
    outs = []
    for t in step_ids:
        logits, state = model.forward(t, state)
        outs.append(logits.clone())
    torch.save({"seq": seq, "steps": torch.stack(outs) if outs else None}, out)


if __name__ == "__main__":
    main()
