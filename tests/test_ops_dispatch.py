"""The dispatch point: implementation order, SPECTRALQUANT_OPS forcing, and the workspace/split helpers."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import WINDOW_CASES, check_windowed_decode_against_reference, window_case_id

from vllm_spectralquant import ops
from vllm_spectralquant.format import PRESETS, paged_attention
from vllm_spectralquant.format.synthetic import random_codec, random_paged_batch
from vllm_spectralquant.ops import cuda_ext, dispatch
from vllm_spectralquant.ops.kernel_codec import kernel_codec, padded_dim
from vllm_spectralquant.ops.workspace import DecodeWorkspace, num_splits


def test_cpu_defaults_to_torch_without_interpreter(monkeypatch):
    monkeypatch.delenv("SPECTRALQUANT_OPS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert dispatch.available_backends(torch.device("cpu")) == ["torch"]
    assert ops.backend_for(torch.device("cpu")) == "torch"


def test_interpreter_makes_triton_available_on_cpu(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("SPECTRALQUANT_OPS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.backend_for(torch.device("cpu")) == "triton"


@pytest.mark.parametrize("forced", ["torch", "triton", "cuda"])
def test_forcing(monkeypatch, forced):
    monkeypatch.setenv("SPECTRALQUANT_OPS", forced)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if forced == "torch":
        assert ops.backend_for(torch.device("cpu")) == "torch"
    else:  # neither runs on CPU tensors without the interpreter / a GPU
        with pytest.raises(RuntimeError, match=f"SPECTRALQUANT_OPS={forced}"):
            ops.backend_for(torch.device("cpu"))


def test_forcing_an_unknown_backend_raises(monkeypatch):
    monkeypatch.setenv("SPECTRALQUANT_OPS", "fortran")
    with pytest.raises(ValueError, match="choose one of"):
        ops.backend_for(torch.device("cpu"))


def test_cuda_is_skipped_for_shapes_it_does_not_cover(monkeypatch):
    monkeypatch.delenv("SPECTRALQUANT_OPS", raising=False)
    monkeypatch.setattr(dispatch, "available_backends", lambda device: ["cuda", "triton", "torch"])
    assert dispatch.backend_for(torch.device("cuda"), cuda_supported=False) == "triton"
    monkeypatch.setenv("SPECTRALQUANT_OPS", "cuda")
    with pytest.raises(RuntimeError):
        dispatch.backend_for(torch.device("cuda"), cuda_supported=False)


def test_forced_torch_decode_matches_reference(monkeypatch):
    monkeypatch.setenv("SPECTRALQUANT_OPS", "torch")
    codec = random_codec(PRESETS["sq3bit"], 32, 2, seed=4)
    batch = random_paged_batch(codec, [9, 1, 20], [1, 1, 1], num_query_heads=4, seed=4)
    out = torch.full((3, 4, 32), float("nan"))
    ops.decode_attention(batch.query, batch.kv_cache, batch.block_table, batch.seq_lens, codec, batch.geometry, 0.2, out)
    ref = paged_attention(batch.query, batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, codec, batch.geometry, 0.2)
    assert torch.allclose(out, ref)


def test_cuda_extension_unavailable_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert not cuda_ext.is_available()
    assert cuda_ext.source_dir().joinpath("sq_decode.cu").is_file()


def test_decode_support_is_answered_by_the_extension():
    """Without a built, loadable extension nothing is 'supported' (the GPU test checks the real matrix)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/test_ops_cuda.py checks the support matrix")
    codec = random_codec(PRESETS["tq3bit"], 128, 8)
    geo = random_paged_batch(random_codec(PRESETS["tq3bit"], 64, 1), [1], [1]).geometry
    assert not cuda_ext.decode_supported(codec, geo, 32)


def test_splits_depend_on_shapes_only():
    cpu = torch.device("cpu")
    assert num_splits(1, 8, 32768, cpu) > num_splits(64, 8, 32768, cpu)
    assert num_splits(1, 8, 100, cpu) == 1  # too short to split
    assert num_splits(32, 8, 32768, cpu) == num_splits(32, 8, 32768, cpu)


def test_workspace_views_fit_and_refuse_to_grow_when_preallocated():
    ws = DecodeWorkspace.for_shapes("cpu", max_batch=4, num_query_heads=8, num_kv_heads=2, head_dim=64, max_splits=8)
    views = ws.views(4, 8, 2, 64, 8, grow=False)
    assert views.w16.shape == (4, 8, padded_dim(64)) and views.w16.dtype == torch.float16
    assert views.part_o.shape == (4, 2, 8, 16, 64)
    with pytest.raises(RuntimeError, match="workspace"):
        ws.views(5, 8, 2, 64, 8, grow=False)


def test_kernel_codec_is_cached_per_codec_and_lut_holds_the_codebooks():
    codec = random_codec(PRESETS["sq2_5bit"], 64, 2, seed=9)
    kc = kernel_codec(codec, "cpu")
    assert kernel_codec(codec, "cpu") is kc
    meta = kc.key.meta
    for h in range(2):
        for g in range(8):
            off, lut, bits, mask = meta[h, g].tolist()
            n = 1 << bits
            assert mask == n - 1 and lut % n == 0  # each table aligned to its size
            assert torch.equal(kc.key.lut32[h, lut : lut + n], codec.key.codebooks[h, g, :n])
    assert torch.equal(meta[..., 0].long(), codec.key_group_offsets())


def test_every_registered_implementation_provides_the_kernel_interface():
    for name in dispatch.IMPLEMENTATIONS:
        impl = ops.get_impl(name)
        assert isinstance(impl, ops.KernelImpl), name
        assert impl.NAME == name
    with pytest.raises(ValueError, match="choose one of"):
        ops.get_impl("fortran")


def test_decode_takes_the_first_implementation_that_covers_the_shape(monkeypatch):
    monkeypatch.delenv("SPECTRALQUANT_OPS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    codec = random_codec(PRESETS["sq3bit"], 32, 1, seed=2)
    geo = random_paged_batch(codec, [3], [1], num_query_heads=2, seed=2).geometry
    assert dispatch.impl_for(torch.device("cpu"), (codec, geo, 2)).NAME == "triton"
    monkeypatch.setattr(ops.get_impl("triton"), "decode_supported", lambda *a: False)
    assert dispatch.impl_for(torch.device("cpu"), (codec, geo, 2)).NAME == "torch"
    assert dispatch.impl_for(torch.device("cpu")).NAME == "triton"  # store/gather: every shape


@pytest.mark.parametrize("window_case", WINDOW_CASES, ids=window_case_id)
def test_torch_reference_windowed_decode_never_uses_tokens_before_the_window(window_case):
    check_windowed_decode_against_reference(ops.get_impl("torch"), window_case, "contiguous", torch.device("cpu"))


def test_windowed_decode_never_takes_the_cuda_kernel():
    """The CUDA decode has no window: it declines windowed calls, and dispatch falls back to Triton there."""
    codec = random_codec(PRESETS["sq3bit"], 64, 1, seed=4)
    geo = random_paged_batch(codec, [3], [1], num_query_heads=4, seed=4).geometry
    assert not cuda_ext.decode_supported(codec, geo, 4, window=512)
    with pytest.raises(NotImplementedError, match="sliding window"):
        cuda_ext.decode_attention(None, None, None, torch.zeros(1), codec, geo, 1.0, None, window=512)
