"""Start-up of the embedded cluster's worker processes (each worker loads this as a Dask preload module).

Importing it makes miditok skip torch in the worker (lean.py; the workers only run `process_batch`) and then
imports the batch code, while the cluster starts, so that the first batch does not pay for the imports.
The worker process imports the driver's main module before this one: that module must not import miditok
(the `musicprep` CLI imports it only inside its commands).
"""

from __future__ import annotations

from .lean import skip_miditok_torch

skip_miditok_torch()

from . import batch  # noqa: E402,F401
