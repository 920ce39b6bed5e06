"""vLLM's compressed caches emulated by our backend: round-trip error, vLLM's bytes, vLLM's own tables,
and the dense cache path (store, then attention over the rounded values)."""

from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.vllm

D = 64
TQ = ["turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc"]


def _kv(seed=0, tokens=64, heads=3):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(tokens, heads, D, generator=g)
    k[..., 3] *= 10  # an outlier channel, as real keys have
    return k, torch.randn(tokens, heads, D, generator=g)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_bytes_per_head_token_are_vllms_allocation():
    from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig

    from vllm_spectralquant.backend.emulated_formats import mean_bytes_per_head_token, vllm_bytes_per_head_token

    for name in TQ:
        assert vllm_bytes_per_head_token(name, D) == TurboQuantConfig.from_cache_dtype(name, D).slot_size_aligned
        assert vllm_bytes_per_head_token(name, 128) == TurboQuantConfig.from_cache_dtype(name, 128).slot_size_aligned
    assert [vllm_bytes_per_head_token(n, 128) for n in TQ] == [134, 118, 102]  # vLLM's documented slot sizes
    # TRITON_ATTN: int4 codes (D/2 bytes each for K and V) plus one inline fp32 scale for each.
    assert vllm_bytes_per_head_token("int4_per_token_head", D) == D + 8
    assert vllm_bytes_per_head_token("fp8", D) == 2 * D
    assert vllm_bytes_per_head_token("bf16_rounded", D) == 4 * D
    # TurboQuant's 4 boundary layers of a 30-layer model stay at bf16 (4 D bytes).
    assert mean_bytes_per_head_token("turboquant_3bit_nc", D, 30, [0, 1, 28, 29]) == pytest.approx((4 * 4 * D + 26 * 54) / 30)


def test_boundary_layers_are_vllms_rule():
    from vllm_spectralquant.backend.emulated_formats import full_precision_layers

    dense = SimpleNamespace(is_hybrid=False, hf_text_config=SimpleNamespace(num_hidden_layers=30))
    assert full_precision_layers("turboquant_4bit_nc", dense) == [0, 1, 28, 29]
    assert full_precision_layers("int4_per_token_head", dense) == []
    assert full_precision_layers("fp8", dense) == []


def test_turboquant_tables_are_vllms():
    from vllm.model_executor.layers.quantization.turboquant.centroids import get_centroids
    from vllm.v1.attention.backends.turboquant_attn import _build_hadamard

    from vllm_spectralquant.backend.emulated_formats import turboquant_tables

    t = turboquant_tables("turboquant_k3v4_nc", D)
    assert (t.key_bits, t.value_bits, t.norm_correction) == (3, 4, True)
    assert torch.equal(t.centroids, get_centroids(D, 3).float())
    assert torch.equal(t.hadamard, _build_hadamard(D, "cpu").float())
    assert torch.allclose(t.hadamard @ t.hadamard, torch.eye(D), atol=1e-5)  # orthonormal, symmetric: Pi = PiT


@pytest.mark.parametrize("name,key_err,value_err", [
    ("bf16_rounded", 4e-3, 4e-3), ("fp8", 0.04, 0.04), ("int4_per_token_head", 0.12, 0.12),
    ("turboquant_4bit_nc", 0.12, 0.12), ("turboquant_k3v4_nc", 0.22, 0.12), ("turboquant_3bit_nc", 0.22, 0.25),
])
def test_roundtrip_error_is_what_the_bits_allow(name, key_err, value_err):
    from vllm_spectralquant.backend.emulated_formats import roundtrip

    k, v = _kv()
    k2, v2 = roundtrip(name, k, v)
    assert k2.shape == k.shape and k2.dtype == k.dtype and v2.dtype == v.dtype
    assert 0 < _rel(k2, k) < key_err and 0 < _rel(v2, v) < value_err
    # A second round trip moves (nearly) nothing for the scalar formats: their values are already on the grid.
    if name in ("bf16_rounded", "fp8"):
        assert torch.equal(roundtrip(name, k2, v2)[0], k2)


def test_fp8_saturates_like_vllm_and_keeps_e4m3_precision():
    from vllm_spectralquant.backend.emulated_formats import fp8_e4m3_roundtrip

    x = torch.tensor([1000.0, -1000.0, 1.0, 0.3])
    y = fp8_e4m3_roundtrip(x)
    assert y[:3].tolist() == [448.0, -448.0, 1.0]
    assert abs(y[3].item() - 0.3) <= 0.3 / 16  # 3 mantissa bits


def test_int4_codes_and_hidden_zero_point():
    from vllm_spectralquant.backend.emulated_formats import int4_dequantize, int4_quantize

    x = torch.randn(5, 2, D)
    codes, scale = int4_quantize(x)
    assert codes.min() >= 0 and codes.max() <= 15 and torch.equal(codes, codes.round())
    back = int4_dequantize(codes, scale)
    step = (x.amax(-1) - x.amin(-1)) / 15
    # Error within half a step, plus the zero point's own rounding (at most half a step) and the
    # scale's 4 cleared mantissa bits.
    assert ((back - x).abs() <= step[..., None] * 1.01 + 1e-6).all()


def test_int4_rotation_is_vllms_and_inverts():
    from vllm.utils.math_utils import largest_power_of_2_divisor
    from vllm.v1.attention.ops.int4_per_token_head import single_rht

    x = torch.randn(7, 2, D)
    b = largest_power_of_2_divisor(D)
    assert torch.allclose(single_rht(single_rht(x), inverse=True) / b, x, atol=1e-5)


def test_turboquant_keys_keep_their_norm():
    from vllm_spectralquant.backend.emulated_formats import turboquant_key_roundtrip, turboquant_tables

    k, _ = _kv()
    k2 = turboquant_key_roundtrip(k, turboquant_tables("turboquant_3bit_nc", D))
    # Norm correction: the decoded key has the stored (fp16) norm.
    assert torch.allclose(k2.norm(dim=-1), k.norm(dim=-1), rtol=2e-3)


def _dense_impl(method):
    from vllm_spectralquant.backend.emulated_dense import EmulatedDenseImpl
    from vllm_spectralquant.emulation import get_emulated

    impl = object.__new__(EmulatedDenseImpl)  # no vLLM config needed for store + attention
    impl.method, impl.head_size, impl.num_heads, impl.num_kv_heads = get_emulated(method), D, 4, 2
    impl.scale, impl.skipped_layers, impl._layer = D**-0.5, set(), 5
    return impl


def test_dense_cache_stores_rounded_values_and_attends_over_them():
    from vllm_spectralquant.backend.attention import SpectralQuantMetadata
    from vllm_spectralquant.format.reference_attention import dense_causal_attention
    from vllm_spectralquant.backend.emulated_dense import page_entry_bytes
    from vllm_spectralquant.backend.emulated_formats import roundtrip

    impl = _dense_impl("turboquant_3bit_nc")
    bs, blocks, n, ctx = 16, 6, 40, 33
    kv_cache = torch.zeros(blocks, 2, bs, page_entry_bytes(D), dtype=torch.uint8)
    k, v = _kv(1, n, 2)
    q = torch.randn(n, 4, D)
    block_table = torch.tensor([[4, 1, 3]], dtype=torch.int32)
    pos = torch.arange(n)
    slots = block_table[0, pos // bs].long() * bs + pos % bs
    layer = SimpleNamespace(layer_name="model.layers.5.self_attn.attn")
    impl.do_kv_cache_update(layer, k[:ctx], v[:ctx], kv_cache, slots[:ctx])  # the first chunk, cached
    md0 = SpectralQuantMetadata(
        num_actual_tokens=ctx, query_start_loc=torch.tensor([0, ctx]), seq_lens=torch.tensor([ctx]),
        block_table=block_table, slot_mapping=slots[:ctx], num_decodes=0, num_decode_tokens=0, num_prefills=1,
        query_start_loc_cpu=torch.tensor([0, ctx]), seq_lens_cpu=torch.tensor([ctx]),
    )
    out0 = torch.empty(ctx, 4, D)  # a first chunk (no cached context) attends over its raw K/V
    impl.forward(layer, q[:ctx], k[:ctx], v[:ctx], kv_cache, md0, output=out0)
    assert torch.allclose(out0, dense_causal_attention(q[:ctx], k[:ctx], v[:ctx], impl.scale), atol=1e-5)
    impl.do_kv_cache_update(layer, k[ctx:], v[ctx:], kv_cache, slots[ctx:])  # the continuation chunk
    md = SpectralQuantMetadata(
        num_actual_tokens=n - ctx, query_start_loc=torch.tensor([0, n - ctx]), seq_lens=torch.tensor([n]),
        block_table=block_table, slot_mapping=slots[ctx:], num_decodes=0, num_decode_tokens=0, num_prefills=1,
        query_start_loc_cpu=torch.tensor([0, n - ctx]), seq_lens_cpu=torch.tensor([n]),
    )
    out = torch.empty(n - ctx, 4, D)
    impl.forward(layer, q[ctx:], k[ctx:], v[ctx:], kv_cache, md, output=out)
    kr, vr = roundtrip("turboquant_3bit_nc", k, v)
    # Context from the cache (rounded), the chunk itself raw: as the packed path and vLLM's TurboQuant do.
    want = dense_causal_attention(q[ctx:], torch.cat([kr[:ctx], k[ctx:]]), torch.cat([vr[:ctx], v[ctx:]]), impl.scale)
    assert torch.allclose(out, want, atol=1e-5)
    # A decode attends over the cache only, its own (rounded) token included.
    md1 = SpectralQuantMetadata(
        num_actual_tokens=1, query_start_loc=torch.tensor([0, 1]), seq_lens=torch.tensor([n]), block_table=block_table,
        slot_mapping=slots[-1:], num_decodes=1, num_decode_tokens=1, num_prefills=0,
        query_start_loc_cpu=torch.tensor([0, 1]), seq_lens_cpu=None,
    )
    out1 = torch.empty(1, 4, D)
    impl.forward(layer, q[-1:], k[-1:], v[-1:], kv_cache, md1, output=out1)
    assert torch.allclose(out1, dense_causal_attention(q[-1:], kr, vr, impl.scale), atol=1e-5)


def test_skipped_layers_store_exact_values():
    from vllm_spectralquant.backend.emulated_dense import page_entry_bytes

    impl = _dense_impl("turboquant_3bit_nc")
    impl.skipped_layers = {5}
    kv_cache = torch.zeros(2, 2, 16, page_entry_bytes(D), dtype=torch.uint8)
    k, v = _kv(2, 4, 2)
    impl.do_kv_cache_update(SimpleNamespace(layer_name="model.layers.5.self_attn.attn"), k, v, kv_cache, torch.arange(4))
    pages = kv_cache.view(torch.float32)
    assert torch.equal(pages[0, :, :4, :D].transpose(0, 1), k) and torch.equal(pages[0, :, :4, D:].transpose(0, 1), v)


def test_emulated_names_resolve_and_register():
    from vllm_spectralquant.emulation import EMULATED_KV_CACHE_DTYPES, get_emulated, is_emulated
    from vllm_spectralquant.plugin import KV_CACHE_DTYPES

    assert set(EMULATED_KV_CACHE_DTYPES) <= set(KV_CACHE_DTYPES)
    assert get_emulated("spectralquant_emulate_fp8").name == "fp8" and is_emulated("fp8") and not is_emulated("sq3bit")
    with pytest.raises(ValueError, match="known: bf16_rounded"):
        get_emulated("int2")
