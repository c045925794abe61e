"""Keep processes that only tokenize from importing torch through miditok.

miditok's package `__init__` imports its optional PyTorch helpers (`miditok.pytorch_data`) whenever torch is
installed, and carries on without them when that import raises ImportError. Tokenizing needs none of it, but
importing torch costs a process about 1.5 s of CPU and 280 MiB of memory. The build's worker processes and the
`musicprep build-shards` process never use those helpers, so they declare the module unavailable before
anything imports miditok (an entry of None in sys.modules makes its import raise ImportError).
"""

from __future__ import annotations

import sys


def skip_miditok_torch() -> bool:
    """Make miditok skip its optional PyTorch helpers in this process; False (no change) if miditok is loaded.

    Only for processes that never use `miditok.pytorch_data`: importing it afterwards raises ImportError.
    """
    if "miditok" in sys.modules:
        return False
    sys.modules.setdefault("miditok.pytorch_data", None)
    return True
