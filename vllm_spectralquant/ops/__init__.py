"""The one dispatch point for packed-cache kernels: CUDA extension > Triton > torch reference.

Every function computes exactly what the torch reference in ``vllm_spectralquant.format``
computes (see docs/FORMAT.md); implementations differ only in speed. ``backend_for`` says which
implementation a call on these tensors takes; ``SPECTRALQUANT_OPS=torch|triton|cuda`` forces one.
``DecodeWorkspace`` is the preallocated scratch that makes ``decode_attention`` allocation-free.
"""

from vllm_spectralquant.ops.dispatch import available_backends, backend_for, decode_attention, gather_context, store_kv
from vllm_spectralquant.ops.workspace import DecodeWorkspace

__all__ = ["DecodeWorkspace", "available_backends", "backend_for", "decode_attention", "gather_context", "store_kv"]
