"""vllm-spectralquant: a calibrated, bit-packed KV-cache format for vLLM.

Importing this package imports neither vLLM nor CUDA code; ``register`` is the
``vllm.general_plugins`` entry point and is the only function that touches vLLM.
"""

from vllm_spectralquant._version import __version__

__all__ = ["__version__", "register"]


def register() -> None:
    """vLLM plugin entry point (idempotent): registers our kv-cache dtypes and backend."""
    from vllm_spectralquant.plugin import register as _register

    _register()
