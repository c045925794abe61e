"""Which torch device a command runs on: the one rule `fit`, `complete` and `eval` share."""

from __future__ import annotations

import torch


class DeviceUnavailable(RuntimeError):
    """The asked-for device does not exist here (the CLIs turn it into a usage error)."""


def pick_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU (cuda:LOCAL_RANK) when CUDA is there, else the CPU; ``cpu``; ``cuda[:N]``."""
    if pref == "cpu":
        return torch.device("cpu")
    if pref != "auto" and not pref.startswith("cuda"):
        raise DeviceUnavailable(f"unknown device {pref!r}: use auto, cpu, cuda or cuda:N")
    if torch.cuda.is_available():
        return torch.device(pref if ":" in pref else f"cuda:{local_rank}")
    if pref != "auto":
        raise DeviceUnavailable(f"--device {pref}: torch sees no CUDA device")
    return torch.device("cpu")
