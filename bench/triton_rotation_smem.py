"""GPU probe: do the Triton store and gather fit in shared memory at head_dim 256, per rotation slice size?

    python bench/triton_rotation_smem.py   # one line per (kernel, basis rows per dot): OK or Triton's OutOfResources

256 rows = the whole basis in one dot (the kernels before slicing); the kernels use
``triton_common.BASIS_ROWS_PER_DOT``.
"""

from __future__ import annotations

import torch

from vllm_spectralquant.format.paged import CacheGeometry
from vllm_spectralquant.format.synthetic import named_random_codec
from vllm_spectralquant.ops import triton_common, triton_gather, triton_store


def main() -> None:
    d, h, block, n = 256, 2, 64, 40
    codec = named_random_codec("sq3bit:sorted", d, h, 1)
    geo = CacheGeometry.for_codec(codec, block, sink_tokens=1)
    cache = torch.zeros(4, h, block, geo.page_slot_bytes, dtype=torch.uint8, device="cuda")
    key, value = (torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    slots = torch.arange(n, device="cuda")
    table = torch.arange(4, device="cuda", dtype=torch.int32)[None, :]
    lens = torch.tensor([n], device="cuda", dtype=torch.int32)
    for rows in (256, 128, 64, 32):
        triton_common.BASIS_ROWS_PER_DOT = rows
        for name, call in (("store", lambda: triton_store.store_kv(key, value, cache, slots, codec, geo)),
                           ("gather", lambda: triton_gather.gather_context(cache, table, lens, codec, geo))):
            try:
                call()
                torch.cuda.synchronize()
                print(f"{name} rows per dot {rows}: OK")
            except Exception as e:  # noqa: BLE001 - the probe reports whatever the compiler says
                print(f"{name} rows per dot {rows}: {type(e).__name__}: {str(e)[:120]}")


if __name__ == "__main__":
    main()
