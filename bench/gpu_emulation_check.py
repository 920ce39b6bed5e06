#!/usr/bin/env python3
"""Do our torch emulations of vLLM's compressed KV caches equal what vLLM's own Triton kernels store? (GPU)

For each format, fresh random K/V (seeds printed) go through vLLM's store kernel into a cache laid out as
vLLM allocates it (NaN/0xFF-poisoned first), are read back with vLLM's dequantisation (its Triton
launcher where one exists, else torch mirroring the kernel), and are compared with
``vllm_spectralquant.backend.emulated_formats.roundtrip`` on the same inputs:

* ``int4_per_token_head``: ``reshape_and_cache_int4`` (through vLLM's per-token-head dispatcher) on the
  TRITON_ATTN cache views (``TritonAttentionImpl._pth_key_value_caches``), dequantised as ``_attn_packed``
  does, then vLLM's inverse ``single_rht`` / b (as ``unified_attention_int4`` un-rotates its output);
* ``turboquant_4bit_nc`` / ``turboquant_k3v4_nc`` / ``turboquant_3bit_nc``: ``triton_turboquant_store``,
  then vLLM's full-dequant kernel ``_tq_full_dequant_kv`` and the fp16 inverse rotation, exactly as
  ``TurboQuantAttentionImpl._continuation_prefill`` does (bf16 model dtype only: TURBOQUANT takes no fp32);
* ``fp8``: vLLM's ``torch.ops._C`` cache op is absent from the python-only build, so our round trip is
  compared with ``x.clamp(-448, 448).to(float8_e4m3fn)`` (what vLLM's cache holds with scale 1.0), and in
  addition with TRITON_ATTN's own fp8 store ``triton_reshape_and_cache_flash`` (Triton, needs no ``_C``).

Per case and for K and V: max abs error, relative (Frobenius) error and the fraction of elements that land on
a different quantisation level (they differ by at least one step, counted as > half a step in the domain the
codes live in: RHT-rotated for int4, Hadamard-rotated for TurboQuant keys, raw for TurboQuant values and fp8,
where any difference is a different fp8 value). Rounding ties (Triton's approximate fp32 division and FMA
contraction against torch's IEEE ops) are expected to move a rare element by one level. A case is ok when,
for both K and V, everything is finite and relative error <= 1e-3 or level mismatches <= 1e-3 of all elements,
and the cache slots no token maps to still hold the poison (no stray writes).

Run on the GPU machine after ``bash gpu-vllm-dist/install.sh && source gpu-vllm-dist/env.sh``, from the repo root:

    python3 bench/gpu_emulation_check.py --out $OUT/gpu_emulation_check.json            # ~30-60 s
    python3 bench/gpu_emulation_check.py --all-shapes --budget-s 120 --out ...            # all 4 (D, H) shapes

Exit 0: every case ran and is ok; 1: some case failed (or raised: its traceback is in the JSON); 2: no failure
but cases were skipped (time budget) or no CUDA device.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REL_TOL = 1e-3
MISMATCH_TOL = 1e-3
NUM_TOKENS = 100
BLOCK_SIZE = 16
SPARE_BLOCKS = 3  # blocks no token maps to: must stay poisoned (no stray writes)
#: (head_dim, kv_heads); the default covers 64 and 128, 2 and 8 once each (Triton compiles per shape).
DEFAULT_SHAPES = [(128, 8), (64, 2)]
ALL_SHAPES = [(128, 8), (64, 2), (128, 2), (64, 8)]
TQ_PRESETS = ("turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc")
FP8_OUTLIERS = 8  # elements per tensor pushed past the e4m3 range (448) to exercise saturation


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") % 2**31


# --------------------------------------------------------------------------- inputs and caches


def make_inputs(seed: int, head_dim: int, kv_heads: int, dtype: torch.dtype, device: torch.device, outliers: int = 0):
    """Key/value ``[NUM_TOKENS, kv_heads, head_dim]`` in the model dtype, as vLLM's ``do_kv_cache_update`` gets them.

    Keys get per-channel scales and offsets (outlier channels, non-zero means, like post-RoPE keys);
    token 0 / head 0 of K is a zero vector and token 1 / head 0 of V a constant one (the zero-norm and
    zero-range corners of the stores).
    """
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_TOKENS, kv_heads, head_dim)
    chan_scale = torch.exp(0.5 * torch.randn(kv_heads, head_dim, generator=g))
    chan_bias = 0.5 * torch.randn(kv_heads, head_dim, generator=g)
    key = torch.randn(shape, generator=g) * chan_scale + chan_bias
    value = torch.randn(shape, generator=g)
    key[0, 0] = 0.0
    value[1, 0] = 0.25
    for t in (key, value):
        if outliers:
            flat = t.view(-1)
            idx = torch.randperm(flat.numel(), generator=g)[:outliers]
            flat[idx] = 600.0 * torch.sign(torch.randn(outliers, generator=g))
    return key.to(device=device, dtype=dtype), value.to(device=device, dtype=dtype)


def make_slots(seed: int, device: torch.device, num_tokens: int = NUM_TOKENS):
    """A shuffled block table and vLLM's slot mapping (int64, ``block * block_size + offset``)."""
    g = torch.Generator().manual_seed(seed + 1)
    used = math.ceil(num_tokens / BLOCK_SIZE)
    num_blocks = used + SPARE_BLOCKS
    block_table = torch.randperm(num_blocks, generator=g)[:used].to(torch.int32)
    t = torch.arange(num_tokens)
    slots = block_table[t // BLOCK_SIZE].long() * BLOCK_SIZE + t % BLOCK_SIZE
    return num_blocks, block_table.to(device), slots.to(device)


def layer_cache(spec, num_blocks: int, layout, device: torch.device):
    """One layer's cache as vLLM builds it: a raw int8 buffer viewed as logical ``[B, H, N, C]``.

    Mirrors ``vllm/v1/kv_cache_interface.py::create_kv_cache_views`` (``compute_layer_kv_cache_shape_bytes``,
    ``compute_layout_strides``, ``as_strided``, ``.view(spec.dtype)``) for a single layer; ``layout`` is the
    resolved ``KVCacheLayout`` (LBNHC: TRITON_ATTN has no preference and LBNHC heads vLLM's default list,
    ``vllm/v1/attention/backends/utils.py::_DEFAULT_LAYOUT_PREFERENCE``; TURBOQUANT supports only LBNHC).
    """
    from vllm.v1.kv_cache_interface import compute_layer_kv_cache_shape_bytes, compute_layout_strides

    shape = compute_layer_kv_cache_shape_bytes(spec, num_blocks)
    strides = compute_layout_strides(spec, num_blocks, 1, layout)
    raw = torch.empty(math.prod(shape), dtype=torch.int8, device=device)
    view5 = torch.as_strided(raw, size=(1, *shape), stride=strides, storage_offset=raw.storage_offset())
    return raw, view5[0].view(spec.dtype)


def untouched(cache_bnhc: torch.Tensor, slots: torch.Tensor) -> bool:
    """Whether every byte of the slots no token maps to is still the 0xFF poison."""
    nb, bs = cache_bnhc.shape[:2]
    written = torch.zeros(nb * bs, dtype=torch.bool, device=cache_bnhc.device)
    written[slots] = True
    rest = cache_bnhc.flatten(0, 1)[~written]
    return bool((rest.view(torch.uint8) == 255).all())


def token_slots(slots: torch.Tensor):
    return slots // BLOCK_SIZE, slots % BLOCK_SIZE


# --------------------------------------------------------------------------- metrics


def compare(vllm_t: torch.Tensor, ours_t: torch.Tensor, vllm_code: torch.Tensor, ours_code: torch.Tensor, step) -> dict:
    """Errors of ours against vLLM in the model domain, and level mismatches in the code domain."""
    a, b = vllm_t.float(), ours_t.float()
    finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    d = (a - b).abs()
    max_abs = float(d.max()) if finite else float("inf")
    rel = float((a - b).norm() / a.norm().clamp_min(1e-30)) if finite else float("inf")
    dc = (vllm_code.float() - ours_code.float()).abs()
    # ~(d <= tol) so that NaN counts as a mismatch
    mismatch = float((~(dc <= 0.5 * step)).float().mean())
    ok = finite and (rel <= REL_TOL or mismatch <= MISMATCH_TOL)
    return {"max_abs": max_abs, "rel_fro": rel, "level_mismatch_frac": mismatch, "finite": finite, "ok": ok}


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| (Frobenius): how much of the input a format's round trip loses."""
    return float((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def real_kv(path: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, key, value) per layer-window of a ``bench/capture_real_kv.py`` file, bf16 [T, H, D], in layer order."""
    from safetensors.torch import load_file

    t = load_file(path)
    names = sorted({k.rsplit(".", 1)[0] for k in t}, key=lambda n: (n.split(".")[1], int(n.split(".")[0][5:])))
    return [(n, t[n + ".key"], t[n + ".value"]) for n in names]


# --------------------------------------------------------------------------- int4_per_token_head


def check_int4(key: torch.Tensor, value: torch.Tensor, num_blocks: int, block_table: torch.Tensor, slots: torch.Tensor) -> dict:
    from vllm.utils.math_utils import largest_power_of_2_divisor
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl
    from vllm.v1.attention.ops import int4_per_token_head as int4_ops
    from vllm.v1.attention.ops.triton_reshape_and_cache_flash import triton_reshape_and_cache_flash_per_token_head_quant
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheLayout, KVQuantMode

    from vllm_spectralquant.backend.emulated_formats import int4_quantize, roundtrip

    T, H, D = key.shape
    mode = KVQuantMode.INT4_PER_TOKEN_HEAD
    # TritonAttentionBackend.customize_spec: C = (D/2 + D/2) bytes + 2 inline fp32 scales per (head, slot)
    spec = TritonAttentionBackend.customize_spec(
        FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=H, head_size=D, dtype=STR_DTYPE_TO_TORCH_DTYPE["int4_per_token_head"], kv_quant_mode=mode)
    )
    raw, kv_cache = layer_cache(spec, num_blocks, KVCacheLayout.LBNHC, key.device)
    # TritonAttentionImpl._pth_key_value_caches / _ensure_scale_caches: K|K-scale|V|V-scale views of the page
    impl = object.__new__(TritonAttentionImpl)
    impl._kv_quant_mode = mode
    key_cache, value_cache = impl._pth_key_value_caches(kv_cache)
    k_scale_cache, v_scale_cache = impl._k_scale_cache, impl._v_scale_cache
    raw.fill_(-1)  # poison after the views (_ensure_scale_caches fills the scales with 1.0): NaN scales, code 15
    # TritonAttentionImpl.do_kv_cache_update -> the per-token-head dispatcher -> reshape_and_cache_int4
    triton_reshape_and_cache_flash_per_token_head_quant(key, value, key_cache, value_cache, k_scale_cache, v_scale_cache, slots, kv_quant_mode=mode)
    torch.cuda.synchronize()

    blk, off = token_slots(slots)
    b = largest_power_of_2_divisor(D)
    ours_k, ours_v = roundtrip("int4_per_token_head", key, value)
    out: dict = {}
    extra: dict = {"untouched_slots_poisoned": untouched(kv_cache.transpose(1, 2), slots), "rht_norm_b": b}
    for name, x, cache, scales, ours in (("K", key, key_cache, k_scale_cache, ours_k), ("V", value, value_cache, v_scale_cache, ours_v)):
        # _attn_packed: unpack_int4_nibbles (low nibble = even coordinate, high = odd), zero point = low 4 bits
        # of the fp32 scale, scale = those bits cleared; value = (code - zp) * scale, in the RHT domain.
        packed = cache[blk, off, :, : D // 2]
        codes = torch.stack((packed & 0xF, (packed >> 4) & 0xF), dim=-1).reshape(T, H, D).float()
        bits = scales[blk, off].contiguous().view(torch.int32)
        zp = (bits & 0xF).float()[..., None]
        scale = (bits & -16).view(torch.float32)[..., None]
        rot_vllm = (codes - zp) * scale
        # unified_attention_int4 un-rotates with single_rht(., inverse=True) / b (b = largest power-of-2 divisor of D)
        vllm_x = (int4_ops.single_rht(rot_vllm, inverse=True) / b).to(x.dtype)
        # our output back in the rotated domain: single_rht(single_rht(y, inverse=True) / b) == y
        rot_ours = int4_ops.single_rht(ours.float())
        out[name] = compare(vllm_x, ours, rot_vllm, rot_ours, scale)
        extra[f"{name}_vllm_rel_err_vs_input"] = rel_error(vllm_x, x)
        # exact stored-code comparison against our quantiser (informational: ties / 1-ulp scale bits)
        our_codes, our_scale = int4_quantize(int4_ops.single_rht(x.float()).to(x.dtype))
        extra[f"{name}_code_diff_frac"] = float((our_codes != codes).float().mean())
        extra[f"{name}_scale_bits_diff_frac"] = float((our_scale.view(torch.int32) != bits).float().mean())
    return {**out, "extra": extra}


# --------------------------------------------------------------------------- TurboQuant


def check_turboquant(preset: str, key: torch.Tensor, value: torch.Tensor, num_blocks: int, block_table: torch.Tensor, slots: torch.Tensor) -> dict:
    from vllm.model_executor.layers.quantization.turboquant.centroids import get_centroids
    from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
    from vllm.triton_utils import triton
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
    from vllm.v1.attention.backends.turboquant_attn import TurboQuantAttentionBackend, _build_hadamard
    from vllm.v1.attention.ops.triton_turboquant_decode import _tq_full_dequant_kv, _use_fp8_e4b15
    from vllm.v1.attention.ops.triton_turboquant_store import triton_turboquant_store
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheLayout, get_kv_quant_mode

    from vllm_spectralquant.backend.emulated_formats import roundtrip, turboquant_tables

    T, H, D = key.shape
    device = key.device
    cfg = TurboQuantConfig.from_cache_dtype(preset, D)
    assert not cfg.key_fp8, f"{preset} has FP8 keys (not emulated)"
    # TurboQuantAttentionImpl._ensure_on_device: Pi = PiT = orthonormal Hadamard, Lloyd-Max centroids, midpoints
    hadamard = _build_hadamard(D, str(device))
    pi_half = hadamard.to(torch.float16)
    centroids = get_centroids(D, cfg.centroid_bits).to(device=device, dtype=torch.float32)
    c_sorted, _ = centroids.sort()
    midpoints = (c_sorted[:-1] + c_sorted[1:]) / 2

    # TurboQuantAttentionBackend.customize_spec: one packed K+V slot of slot_size_aligned bytes per (head, token)
    spec = TurboQuantAttentionBackend.customize_spec(
        FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=H, head_size=D, dtype=STR_DTYPE_TO_TORCH_DTYPE.get(preset, torch.uint8), kv_quant_mode=get_kv_quant_mode(preset))
    )
    raw, kv_logical = layer_cache(spec, num_blocks, KVCacheLayout.LBNHC, device)
    raw.fill_(-1)
    kv_cache = kv_logical.transpose(1, 2)  # do_kv_cache_update / forward: (B, H, N, C) -> (B, N, H, C)
    # TurboQuantAttentionImpl._store_kv (AoS path; the SoA one is FlyDSL/ROCm only)
    triton_turboquant_store(
        key, value, kv_cache, slots, hadamard, midpoints,
        mse_bits=cfg.key_mse_bits, key_packed_size=cfg.key_packed_size,
        value_quant_bits=cfg.effective_value_quant_bits, key_fp8=cfg.key_fp8,
    )

    # TurboQuantAttentionImpl._continuation_prefill with cached_len = T: the full-dequant kernel into fp16
    # buffers (NaN-poisoned), then k @ Pi_half (fp16) and the cast to the model dtype.
    mse_bytes = math.ceil(D * cfg.key_mse_bits / 8)
    val_data_bytes = math.ceil(D * cfg.effective_value_quant_bits / 8)
    alloc_len = math.ceil(T / BLOCK_SIZE) * BLOCK_SIZE
    k_buf = torch.full((1, H, alloc_len, D), float("nan"), dtype=torch.float16, device=device)
    v_buf = torch.full((1, H, alloc_len, D), float("nan"), dtype=torch.float16, device=device)
    bt = block_table[None, :]
    _tq_full_dequant_kv[(alloc_len, 1 * H)](
        kv_cache, bt, centroids, k_buf, v_buf,
        k_buf.stride(0), k_buf.stride(1), k_buf.stride(2),
        v_buf.stride(0), v_buf.stride(1), v_buf.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        bt.stride(0),
        HEAD_DIM=D, BLOCK_SIZE=BLOCK_SIZE, NUM_KV_HEADS=H, MSE_BYTES=mse_bytes, KPS=cfg.key_packed_size,
        VQB=cfg.effective_value_quant_bits, VAL_DATA_BYTES=val_data_bytes, MSE_BITS=cfg.key_mse_bits,
        KEY_FP8=0, BLOCK_D=triton.next_power_of_2(D), NORM_CORRECTION=1 if cfg.norm_correction else 0,
        FP8_E4B15=_use_fp8_e4b15(device.index or 0), num_warps=4,
    )
    torch.cuda.synchronize()
    k_rot = k_buf[0, :, :T, :]  # [H, T, D], Hadamard domain
    vllm_k = (k_rot.reshape(-1, D) @ pi_half).reshape(H, T, D).transpose(0, 1).to(key.dtype)
    vllm_v = v_buf[0, :, :T, :].transpose(0, 1).to(value.dtype)

    ours_k, ours_v = roundtrip(preset, key, value)
    # keys, Hadamard domain: a different centroid moves a coordinate by >= min gap * fp16 norm
    rot_vllm = k_rot.transpose(0, 1).float()
    rot_ours = (ours_k.float().reshape(-1, D) @ hadamard).reshape(T, H, D)
    norm16 = key.float().norm(dim=-1, keepdim=True).half().float()
    step_k = (c_sorted[1:] - c_sorted[:-1]).min() * norm16
    # values: uniform levels of (max - min) / (2**bits - 1), floored at 1e-8 (_store_quantized_value)
    v32 = value.float()
    step_v = ((v32.amax(-1, keepdim=True) - v32.amin(-1, keepdim=True)) / (2**cfg.effective_value_quant_bits - 1)).clamp_min(1e-8)
    t = turboquant_tables(preset, D)
    extra = {
        "untouched_slots_poisoned": untouched(kv_cache, slots),
        "slot_bytes": spec.state_content_size_bytes,
        "tables_equal": bool(
            torch.equal(t.centroids.to(device), centroids) and torch.equal(t.midpoints.to(device), midpoints) and torch.equal(t.hadamard.to(device), hadamard)
        ),
        "bits": [cfg.key_mse_bits, cfg.effective_value_quant_bits, t.key_bits, t.value_bits],
        "vllm_dequant": "_tq_full_dequant_kv (fp16 out) + k @ Pi_half, as _continuation_prefill",
        "K_vllm_rel_err_vs_input": rel_error(vllm_k, key),
        "V_vllm_rel_err_vs_input": rel_error(vllm_v, value),
    }
    return {
        "K": compare(vllm_k, ours_k, rot_vllm, rot_ours, step_k),
        "V": compare(vllm_v, ours_v, v_buf[0, :, :T, :].transpose(0, 1), ours_v, step_v),
        "extra": extra,
    }


# --------------------------------------------------------------------------- fp8


def fp8_reference(x: torch.Tensor) -> torch.Tensor:
    """What vLLM's fp8 (e4m3) cache holds with scale 1.0: saturate to the finite range, cast, read as float."""
    return x.float().clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()


def check_fp8(key: torch.Tensor, value: torch.Tensor, num_blocks: int, block_table: torch.Tensor, slots: torch.Tensor) -> dict:
    from vllm_spectralquant.backend.emulated_formats import roundtrip

    ours_k, ours_v = roundtrip("fp8", key, value)
    rk, rv = fp8_reference(key), fp8_reference(value)
    # step 0: any difference between two fp8 values is a different level
    return {
        "K": compare(rk, ours_k, rk, ours_k, 0.0),
        "V": compare(rv, ours_v, rv, ours_v, 0.0),
        "extra": {"reference": "torch x.clamp(-448, 448).to(float8_e4m3fn) (vLLM's _C cache op is absent in the python-only build)"},
    }


def check_fp8_triton(key: torch.Tensor, value: torch.Tensor, num_blocks: int, block_table: torch.Tensor, slots: torch.Tensor) -> dict:
    """TRITON_ATTN's own fp8 store (``triton_reshape_and_cache_flash``, scale 1.0) on its cache views."""
    from vllm.platforms import current_platform
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend
    from vllm.v1.attention.ops.triton_reshape_and_cache_flash import triton_reshape_and_cache_flash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheLayout, get_kv_quant_mode

    from vllm_spectralquant.backend.emulated_formats import roundtrip

    T, H, D = key.shape
    spec = TritonAttentionBackend.customize_spec(
        FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=H, head_size=D, dtype=STR_DTYPE_TO_TORCH_DTYPE["fp8"], kv_quant_mode=get_kv_quant_mode("fp8"))
    )
    raw, kv_cache = layer_cache(spec, num_blocks, KVCacheLayout.LBNHC, key.device)
    raw.fill_(-1)  # 0xFF is NaN in e4m3fn
    # TritonAttentionImpl.do_kv_cache_update (non-per-token-head branch): (B, H, N, 2D) -> K, V [B, N, H, D] as fp8
    fp8 = current_platform.fp8_dtype()
    key_u8, value_u8 = kv_cache.transpose(1, 2).split(D, dim=-1)
    key_cache, value_cache = key_u8.view(fp8), value_u8.view(fp8)
    one = torch.ones((), dtype=torch.float32, device=key.device)  # layer._k_scale / _v_scale without calibration
    triton_reshape_and_cache_flash(key, value, key_cache, value_cache, slots, "fp8", one, one)
    torch.cuda.synchronize()
    blk, off = token_slots(slots)
    vk = key_u8[blk, off].view(fp8).float() * one  # unified_attention reads k * k_descale (gathered as bytes)
    vv = value_u8[blk, off].view(fp8).float() * one
    ours_k, ours_v = roundtrip("fp8", key, value)
    return {
        "K": compare(vk, ours_k, vk, ours_k, 0.0),
        "V": compare(vv, ours_v, vv, ours_v, 0.0),
        "extra": {"untouched_slots_poisoned": untouched(kv_cache.transpose(1, 2), slots), "fp8_dtype": str(fp8)},
    }


# --------------------------------------------------------------------------- driver

CHECKS = {
    "int4_per_token_head": check_int4,
    "fp8": check_fp8,
    "fp8[triton_store]": check_fp8_triton,
    **{p: functools.partial(check_turboquant, p) for p in TQ_PRESETS},
}


def cases(shapes: list[tuple[int, int]]) -> list[tuple[str, int, int, torch.dtype]]:
    """Every method on the first shape before the next shape, so a time-budget cut still covers every method."""
    out = []
    for d, h in shapes:
        out += [("int4_per_token_head", d, h, torch.bfloat16)]
        out += [(p, d, h, torch.bfloat16) for p in TQ_PRESETS]
        out += [("fp8", d, h, torch.bfloat16), ("fp8[triton_store]", d, h, torch.bfloat16)]
        out += [("int4_per_token_head", d, h, torch.float32), ("fp8", d, h, torch.float32), ("fp8[triton_store]", d, h, torch.float32)]
    return out


def environment() -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        env["triton"] = repr(e)
    try:
        import vllm

        env["vllm"] = getattr(vllm, "__version__", "?")
        env["vllm_path"] = str(Path(vllm.__file__).parent)
    except Exception as e:  # noqa: BLE001
        env["vllm"] = repr(e)
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["capability"] = list(torch.cuda.get_device_capability(0))
    try:  # which Hadamard tier single_rht uses (hadacore needs torch.ops._C; else the Triton MMA kernel, bf16)
        from vllm.v1.attention.ops.int4_per_token_head import _hadacore_available

        env["int4_hadacore"] = bool(_hadacore_available())
    except Exception as e:  # noqa: BLE001
        env["int4_hadacore"] = repr(e)
    return env


def fmt(r: dict, side: str) -> str:
    m = r.get(side)
    if not m:
        return f"{'-':>9} {'-':>9} {'-':>9}"
    return f"{m['max_abs']:9.2e} {m['rel_fro']:9.2e} {m['level_mismatch_frac']:9.2e}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_emulation_check.json", help="JSON report path")
    ap.add_argument("--all-shapes", action="store_true", help="all four (head_dim, kv_heads) combinations, not two")
    ap.add_argument("--only", default="", help="comma-separated methods (default: all)")
    ap.add_argument("--seed", type=int, default=None, help="base seed (default: fresh per case)")
    ap.add_argument("--budget-s", type=float, default=55.0, help="skip the remaining cases past this many seconds")
    ap.add_argument("--kv-file", default=None,
                    help="real K/V (bench/capture_real_kv.py): every layer-window through int4 and TurboQuant instead of random inputs")
    args = ap.parse_args(argv)
    t0 = time.monotonic()

    if not torch.cuda.is_available():
        print("no CUDA device: this check runs vLLM's Triton kernels on the GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    from vllm import envs as vllm_envs

    # vllm/v1/worker/gpu_worker.py sets this before any layer runs (default "highest": no TF32)
    torch.set_float32_matmul_precision(vllm_envs.VLLM_FLOAT32_MATMUL_PRECISION)
    env = environment()
    env["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    print(json.dumps(env))
    only = {s for s in args.only.split(",") if s}
    todo = [c for c in cases(ALL_SHAPES if args.all_shapes else DEFAULT_SHAPES) if not only or c[0] in only]
    real = {}
    if args.kv_file:
        real = {name: (k, v) for name, k, v in real_kv(args.kv_file)}
        methods = [m for m in ("int4_per_token_head", *TQ_PRESETS) if not only or m in only]
        todo = [(m, name) for name in real for m in methods]

    results = []
    for i, case in enumerate(todo):
        if real:
            method, source = case
            k_real, v_real = real[source]
            d, h, dtype, num_tokens = k_real.shape[2], k_real.shape[1], torch.bfloat16, k_real.shape[0]
        else:
            (method, d, h, dtype), source, num_tokens = case, None, NUM_TOKENS
        rec = {"method": method, "head_dim": d, "kv_heads": h, "dtype": str(dtype).removeprefix("torch."), "num_tokens": num_tokens,
               "block_size": BLOCK_SIZE, "source": source or "random"}
        if time.monotonic() - t0 > args.budget_s:
            rec.update(verdict="skipped", error=f"time budget of {args.budget_s:.0f} s spent")
            results.append(rec)
            continue
        seed = args.seed + i if args.seed is not None else fresh_seed()
        rec["seed"] = seed
        print(f"[{time.monotonic() - t0:5.1f}s] {method} D={d} H={h} {rec['dtype']} seed={seed}", flush=True)
        t1 = time.monotonic()
        try:
            if real:
                key, value = (t.to(device) for t in real[source])
            else:
                outliers = FP8_OUTLIERS if method.startswith("fp8") else 0
                key, value = make_inputs(seed, d, h, dtype, device, outliers)
            num_blocks, block_table, slots = make_slots(seed, device, num_tokens)
            r = CHECKS[method](key, value, num_blocks, block_table, slots)
            ok = r["K"]["ok"] and r["V"]["ok"] and r["extra"].get("untouched_slots_poisoned", True)
            rec.update(r, verdict="ok" if ok else "FAIL", error=None)
        except Exception:  # noqa: BLE001 - one failure must not hide the other methods
            rec.update(verdict="FAIL", error=traceback.format_exc())
            print(rec["error"], file=sys.stderr)
        rec["seconds"] = round(time.monotonic() - t1, 2)
        results.append(rec)

    head = f"{'method':<22} {'D':>4} {'H':>2} {'dtype':<9} | {'K max':>9} {'K rel':>9} {'K mism':>9} | {'V max':>9} {'V rel':>9} {'V mism':>9} | verdict"
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        line = f"{r['method']:<22} {r['head_dim']:>4} {r['kv_heads']:>2} {r['dtype']:<9} | {fmt(r, 'K')} | {fmt(r, 'V')} | {r['verdict']}"
        if r["verdict"] == "FAIL" and r.get("error"):
            line += "  (" + r["error"].strip().splitlines()[-1][:80] + ")"
        print(line)
    if real:
        print("\nvLLM's own round trip vs the real input (relative Frobenius error), per method: K / V, over the layer-windows")
        for m in dict.fromkeys(r["method"] for r in results):
            rows = [r for r in results if r["method"] == m and r.get("extra")]
            for side in ("K", "V"):
                errs = [r["extra"][f"{side}_vllm_rel_err_vs_input"] for r in rows]
                if errs:
                    worst = max(rows, key=lambda r: r["extra"][f"{side}_vllm_rel_err_vs_input"])
                    print(f"  {m:<22} {side}: median {sorted(errs)[len(errs) // 2]:.3e}  max {max(errs):.3e} ({worst['source']})")
    print("fp8: vLLM's torch.ops._C cache op is absent in the python-only build; 'fp8' compares with the torch cast "
          "x.clamp(-448, 448).to(float8_e4m3fn) (vLLM's cache with scale 1.0), 'fp8[triton_store]' with TRITON_ATTN's Triton store.")

    n_fail = sum(r["verdict"] == "FAIL" for r in results)
    n_skip = sum(r["verdict"] == "skipped" for r in results)
    summary = {"cases": len(results), "ok": sum(r["verdict"] == "ok" for r in results), "failed": n_fail, "skipped": n_skip,
               "all_ok": n_fail == 0 and n_skip == 0, "rel_tol": REL_TOL, "mismatch_tol": MISMATCH_TOL,
               "seconds": round(time.monotonic() - t0, 1)}
    print(json.dumps(summary))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "environment": env, "results": results}, indent=1))
    print(f"wrote {out}")
    return 0 if summary["all_ok"] else (1 if n_fail else 2)


if __name__ == "__main__":
    sys.exit(main())
