"""The ``vllm.general_plugins`` entry point: registers our kv-cache dtypes (idempotent).

vLLM calls it in every process (API server, engine core, workers), possibly several times.
Nothing changes for users who do not ask for a ``spectralquant_*`` dtype.
"""

from __future__ import annotations

import logging

from vllm_spectralquant.format.presets import PRESETS

logger = logging.getLogger(__name__)

KV_CACHE_DTYPES = tuple(p.kv_cache_dtype for p in PRESETS.values())

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm_spectralquant.backend.vllm_compat import register_kv_cache_dtypes

    register_kv_cache_dtypes(KV_CACHE_DTYPES)
    _registered = True
    logger.debug("vllm-spectralquant registered kv-cache dtypes %s", ", ".join(KV_CACHE_DTYPES))
