"""The one dispatch point for packed-cache kernels: CUDA extension > Triton > torch reference.

Every function computes exactly what the torch reference in ``vllm_spectralquant.format``
computes (see docs/FORMAT.md); implementations differ only in speed. Each one is a module with the
``KernelImpl`` names, registered in ``ops.dispatch.IMPLEMENTATIONS``; ``get_impl(name)`` returns one,
``backend_for`` says which a call on these tensors takes; ``SPECTRALQUANT_OPS=torch|triton|cuda`` forces one.
``DecodeWorkspace`` is the preallocated scratch that makes ``decode_attention`` allocation-free.
"""

from vllm_spectralquant.ops.dispatch import (
    available_backends,
    backend_for,
    decode_attention,
    gather_context,
    get_impl,
    store_kv,
)
from vllm_spectralquant.ops.kernel_impl import KernelImpl
from vllm_spectralquant.ops.workspace import DecodeWorkspace

__all__ = [
    "DecodeWorkspace",
    "KernelImpl",
    "available_backends",
    "backend_for",
    "decode_attention",
    "gather_context",
    "get_impl",
    "store_kv",
]
