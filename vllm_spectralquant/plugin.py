"""The ``vllm.general_plugins`` entry point (idempotent).

vLLM calls it in every process (API server, engine core, workers), possibly several times. It
registers our kv-cache dtypes, puts the backend in the CUSTOM slot, and makes the CPU platform
honour the request for it. Nothing changes for users who ask for neither CUSTOM nor a
``spectralquant_*`` dtype.
"""

from __future__ import annotations

import logging

from vllm_spectralquant.emulation import EMULATED_KV_CACHE_DTYPES
from vllm_spectralquant.format.presets import PRESETS

logger = logging.getLogger(__name__)

KV_CACHE_DTYPES = tuple(p.kv_cache_dtype for p in PRESETS.values()) + EMULATED_KV_CACHE_DTYPES
DTYPE_PREFIX = "spectralquant_"
BACKEND_CLASS = "vllm_spectralquant.backend.attention.SpectralQuantBackend"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm_spectralquant.backend import vllm_compat

    vllm_compat.register_kv_cache_dtypes(KV_CACHE_DTYPES)
    vllm_compat.register_custom_backend(BACKEND_CLASS)
    vllm_compat.route_cpu_platform(BACKEND_CLASS, DTYPE_PREFIX)
    _registered = True
    logger.debug("vllm-spectralquant registered kv-cache dtypes %s and the CUSTOM backend", ", ".join(KV_CACHE_DTYPES))
