"""The vLLM backend without a server: forward path on hand-made metadata, spec, routing, startup errors."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from vllm_spectralquant.artifact import ArtifactError  # noqa: E402
from vllm_spectralquant.backend.config import ServingConfigError, SpectralQuantConfig  # noqa: E402
from vllm_spectralquant.format import PRESETS  # noqa: E402
from vllm_spectralquant.format.errors import FormatError  # noqa: E402
from vllm_spectralquant.format.reference_attention import dense_causal_attention, gather_context  # noqa: E402
from vllm_spectralquant.format.synthetic import random_paged_batch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_config():
    SpectralQuantConfig.cache_clear()
    yield
    SpectralQuantConfig.cache_clear()


def _fake_config(model_dir, **spectralquant):
    return SimpleNamespace(
        model_config=SimpleNamespace(model=str(model_dir), hf_config=None),
        parallel_config=SimpleNamespace(decode_context_parallel_size=1, prefill_context_parallel_size=1),
        additional_config={"spectralquant": spectralquant} if spectralquant else {},
    )


@pytest.fixture
def use_config(monkeypatch):
    import vllm.config

    def use(cfg):
        monkeypatch.setattr(vllm.config, "get_current_vllm_config_or_none", lambda: cfg)

    return use


def _impl(dtype="spectralquant_sq3bit", heads=4, kv_heads=2, head_dim=32, sliding_window=None, **kw):
    from vllm_spectralquant.backend.attention import SpectralQuantImpl

    return SpectralQuantImpl(heads, head_dim, head_dim**-0.5, kv_heads, None, sliding_window, dtype, None, **kw)


def test_mixed_batch_forward_matches_the_reference(use_config, tiny_artifact, tiny_calib_model_dir):
    """Decodes over the packed cache, a first chunk over raw K/V, a continuation over packed context + raw chunk."""
    from vllm_spectralquant.backend.attention import SpectralQuantMetadata

    use_config(_fake_config(tiny_calib_model_dir, artifact=str(tiny_artifact.artifact)))
    impl = _impl()
    layer = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")
    codec = impl.layer_codec(layer, torch.device("cpu"))
    # Sequences: 2 decodes (40, 1 tokens of context), a first chunk of 9, a continuation of 5 over 30.
    seq_lens, q_lens = [40, 1, 9, 30], [1, 1, 9, 5]
    batch = random_paged_batch(codec, seq_lens, q_lens, block_size=16, num_query_heads=4, padding_tokens=3, seed=7,
                               sink_tokens=impl.config.sink_tokens)
    t = batch.num_tokens
    key = torch.randn(t + 3, 2, 32)
    value = torch.randn(t + 3, 2, 32)
    # The new tokens' K/V as vLLM passes them: the last q_len tokens of each sequence.
    qsl = batch.query_start_loc.tolist()
    for r, (n, q) in enumerate(zip(seq_lens, q_lens)):
        key[qsl[r] : qsl[r + 1]] = batch.keys[r][n - q :]
        value[qsl[r] : qsl[r + 1]] = batch.values[r][n - q :]
    md = SpectralQuantMetadata(
        num_actual_tokens=t,
        query_start_loc=batch.query_start_loc,
        seq_lens=batch.seq_lens,
        block_table=batch.block_table,
        slot_mapping=torch.zeros(t, dtype=torch.long),
        num_decodes=2,
        num_decode_tokens=2,
        num_prefills=2,
        query_start_loc_cpu=batch.query_start_loc,
        seq_lens_cpu=batch.seq_lens,
    )
    out = torch.full((t + 3, 4, 32), float("nan"))
    impl.forward(layer, batch.query, key, value, batch.kv_cache, md, output=out)
    scale = 32**-0.5
    k_ctx, v_ctx = gather_context(batch.kv_cache, batch.block_table, batch.seq_lens, codec, batch.geometry)
    for r, (n, q) in enumerate(zip(seq_lens, q_lens)):
        qr = batch.query[qsl[r] : qsl[r + 1]]
        if r < 2:  # decode: everything from the packed cache
            ref = dense_causal_attention(qr, k_ctx[r, :n], v_ctx[r, :n], scale)
        elif q == n:  # first chunk: raw K/V
            ref = dense_causal_attention(qr, batch.keys[r], batch.values[r], scale)
        else:  # continuation: packed cached context + raw chunk
            k = torch.cat([k_ctx[r, : n - q], batch.keys[r][n - q :]])
            v = torch.cat([v_ctx[r, : n - q], batch.values[r][n - q :]])
            ref = dense_causal_attention(qr, k, v, scale)
        got = out[qsl[r] : qsl[r + 1]]
        assert ((got - ref).norm() / ref.norm()).item() < 1e-5, r
    assert torch.isnan(out[t:]).all()  # padding rows untouched


def test_sliding_window_forward_reads_only_the_window(use_config, tiny_artifact, tiny_calib_model_dir):
    """A sliding-window layer: decodes and prefills attend their last ``window`` positions only, and the blocks
    vLLM freed before the window (here: pointing at a block of 0xFF bytes, NaN in every field) are never used."""
    from vllm_spectralquant.backend.attention import SpectralQuantMetadata

    # One exact sink: with 4-token blocks, more would make every token of a tile's first block exact.
    use_config(_fake_config(tiny_calib_model_dir, artifact=str(tiny_artifact.artifact), sink_tokens=1))
    window = 8
    impl = _impl(sliding_window=window)
    assert impl.sliding_window == window
    layer = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")
    codec = impl.layer_codec(layer, torch.device("cpu"))
    # 2 decodes (40 and 3 tokens of context), a first chunk of 20 (longer than the window), a continuation of 5 over 30.
    seq_lens, q_lens = [40, 3, 20, 30], [1, 1, 20, 5]
    batch = random_paged_batch(codec, seq_lens, q_lens, block_size=4, num_query_heads=4, padding_tokens=3, seed=9,
                               sink_tokens=impl.config.sink_tokens)
    t = batch.num_tokens
    key, value = torch.randn(t + 3, 2, 32), torch.randn(t + 3, 2, 32)
    qsl = batch.query_start_loc.tolist()
    for r, (n, q) in enumerate(zip(seq_lens, q_lens)):
        key[qsl[r] : qsl[r + 1]] = batch.keys[r][n - q :]
        value[qsl[r] : qsl[r + 1]] = batch.values[r][n - q :]
    cache = torch.cat([batch.kv_cache, torch.full_like(batch.kv_cache[:1], 0xFF)])
    table = batch.block_table.clone()
    for r, (n, q) in enumerate(zip(seq_lens, q_lens)):
        first_needed = max(n - q - window + 1, 0)  # vLLM frees the blocks wholly before the first query's window
        table[r, : first_needed // 4] = cache.shape[0] - 1
    md = SpectralQuantMetadata(
        num_actual_tokens=t, query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens, block_table=table,
        slot_mapping=torch.zeros(t, dtype=torch.long), num_decodes=2, num_decode_tokens=2, num_prefills=2,
        query_start_loc_cpu=batch.query_start_loc, seq_lens_cpu=batch.seq_lens,
    )  # fmt: skip
    out = torch.full((t + 3, 4, 32), float("nan"))
    impl.forward(layer, batch.query, key, value, cache, md, output=out)
    scale = 32**-0.5
    k_ctx, v_ctx = gather_context(batch.kv_cache, batch.block_table, batch.seq_lens, codec, batch.geometry)
    for r, (n, q) in enumerate(zip(seq_lens, q_lens)):
        qr = batch.query[qsl[r] : qsl[r + 1]]
        if r < 2:
            k, v = k_ctx[r, :n], v_ctx[r, :n]
        else:  # prefills: packed cached context + the chunk's raw K/V
            k = torch.cat([k_ctx[r, : n - q], batch.keys[r][n - q :]])
            v = torch.cat([v_ctx[r, : n - q], batch.values[r][n - q :]])
        ref = dense_causal_attention(qr, k, v, scale, window=window)
        got = out[qsl[r] : qsl[r + 1]]
        assert torch.isfinite(got).all(), f"row {r} used a token before its window"
        assert ((got - ref).norm() / ref.norm()).item() < 1e-5, r
    assert torch.isnan(out[t:]).all()


def test_profiling_run_without_metadata_writes_zeros(use_config, tiny_calib_model_dir):
    use_config(_fake_config(tiny_calib_model_dir))
    impl = _impl("spectralquant_tq3bit")
    out = torch.full((5, 4, 32), float("nan"))
    impl.forward(SimpleNamespace(layer_name="model.layers.0.self_attn.attn"), torch.randn(5, 4, 32), None, None, torch.zeros(0, dtype=torch.uint8), None, output=out)
    assert (out == 0).all()


def test_do_kv_cache_update_skips_padding_slots(use_config, tiny_calib_model_dir):
    use_config(_fake_config(tiny_calib_model_dir))
    impl = _impl("spectralquant_tq3bit")
    geo = impl.config.geometry(16)
    cache = torch.zeros(3, 2, 16, geo.page_slot_bytes, dtype=torch.uint8)
    k = torch.randn(4, 2, 32)
    impl.do_kv_cache_update(SimpleNamespace(layer_name="model.layers.0.self_attn.attn"), k, k, cache, torch.tensor([17, -1, 33]))
    written = (cache[..., : geo.slot_bytes] != 0).any(-1).any(1).flatten().nonzero().flatten().tolist()
    assert written == [17, 33]


def test_customize_spec_allocates_packed_bytes(use_config, tiny_calib_model_dir):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_spectralquant.backend.attention import SpectralQuantBackend

    use_config(_fake_config(tiny_calib_model_dir))
    _impl("spectralquant_tq2_5bit")
    spec = FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=32, dtype=torch.uint8)
    out = SpectralQuantBackend.customize_spec(spec)
    slot = PRESETS["tq2_5bit"].slot_bytes(32)
    assert out.state_content_bytes == slot + 1  # sink spill: 4*32 bytes / 128 offsets
    assert out.page_size_bytes == 2 * 128 * (slot + 1)
    bf16 = FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)
    assert SpectralQuantBackend.customize_spec(bf16) is bf16


def test_customize_spec_answers_vllms_one_token_sliding_probe(use_config, tiny_calib_model_dir):
    """vLLM sizes sliding-window layers by asking for a 1-token block first (Gemma 3 with 4 sinks crashed on it)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    from vllm_spectralquant.backend.attention import SpectralQuantBackend

    use_config(_fake_config(tiny_calib_model_dir, sink_tokens=4))
    _impl("spectralquant_tq2_5bit")
    slot = PRESETS["tq2_5bit"].slot_bytes(32)
    probe = SlidingWindowSpec(block_size=1, num_kv_heads=2, head_size=32, dtype=torch.uint8, sliding_window=512)
    assert SpectralQuantBackend.customize_spec(probe).state_content_bytes == slot + 4 * 128 // 4  # as a 4-token block
    final = SlidingWindowSpec(block_size=128, num_kv_heads=2, head_size=32, dtype=torch.uint8, sliding_window=512)
    assert SpectralQuantBackend.customize_spec(final).state_content_bytes == slot + 4  # 4 sinks * 128 B / 128
    with pytest.raises(FormatError, match=r"sink_tokens \(4\) must be between 0 and the block size \(2\)"):
        SpectralQuantBackend.customize_spec(FullAttentionSpec(block_size=2, num_kv_heads=2, head_size=32, dtype=torch.uint8))


def test_startup_errors_name_the_cause(use_config, tiny_artifact, tiny_calib_model_dir, example_model_dir, tmp_path):
    # Artifact missing (the model folder has none and none was given).
    use_config(_fake_config(tiny_calib_model_dir))
    with pytest.raises(ArtifactError, match="no SpectralQuant artifact at .*spectralquant calibrate"):
        _impl()
    # Checksum mismatch.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_artifact.artifact, broken)
    f = broken / "bases.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 1
    f.write_bytes(bytes(data))
    SpectralQuantConfig.cache_clear()
    use_config(_fake_config(tiny_calib_model_dir, artifact=str(broken)))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        _impl()
    # Wrong model: the tiny model's artifact for SmolLM2.
    SpectralQuantConfig.cache_clear()
    use_config(_fake_config(example_model_dir, artifact=str(tiny_artifact.artifact)))
    with pytest.raises(ArtifactError, match="different model.*num_layers: artifact has 3, model has 30"):
        _impl(heads=9, kv_heads=3, head_dim=64)
    # Preset not in the artifact.
    partial = tmp_path / "partial"
    shutil.copytree(tiny_artifact.artifact, partial)
    m = json.loads((partial / "manifest.json").read_text())
    m["presets"] = [p for p in m["presets"] if p["name"] != "sq4bit"]
    (partial / "manifest.json").write_text(json.dumps(m))
    SpectralQuantConfig.cache_clear()
    use_config(_fake_config(tiny_calib_model_dir, artifact=str(partial)))
    with pytest.raises(ArtifactError, match="preset sq4bit is not in the artifact"):
        _impl("spectralquant_sq4bit")
    # Unknown option.
    SpectralQuantConfig.cache_clear()
    use_config(_fake_config(tiny_calib_model_dir, artefact="x"))
    with pytest.raises(ServingConfigError, match=r"unknown --additional-config \"spectralquant\" options \['artefact'\]"):
        _impl()


def test_unsupported_attention_is_refused(use_config, tiny_calib_model_dir):
    from vllm.v1.attention.backend import AttentionType

    from vllm_spectralquant.format.errors import FormatError

    use_config(_fake_config(tiny_calib_model_dir))
    with pytest.raises(FormatError, match="unsupported head_dim 20"):
        _impl("spectralquant_tq3bit", head_dim=20)
    from vllm_spectralquant.backend.attention import SpectralQuantImpl

    with pytest.raises(NotImplementedError, match="logits soft-capping"):
        SpectralQuantImpl(4, 32, 0.1, 2, None, 64, "spectralquant_tq3bit", 50.0)
    with pytest.raises(NotImplementedError, match="encoder"):
        SpectralQuantImpl(4, 32, 0.1, 2, None, None, "spectralquant_tq3bit", None, AttentionType.ENCODER)
    with pytest.raises(ValueError, match="serves kv-cache dtypes"):
        SpectralQuantImpl(4, 32, 0.1, 2, None, None, "auto")


def test_cpu_routing_only_when_asked():
    """Our backend for CUSTOM / our dtype; CPU_ATTN for everyone else; never our dtype on CPU_ATTN."""
    import vllm_spectralquant
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    vllm_spectralquant.register()

    def cfg(kv_dtype, **kw):
        base = dict(head_size=64, dtype=torch.float32, kv_cache_dtype=kv_dtype, block_size=None, use_mla=False, has_sink=False,
                    use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False, attn_type="decoder")
        fields = AttentionSelectorConfig._fields
        return AttentionSelectorConfig(**{k: v for k, v in {**base, **kw}.items() if k in fields})

    ours = "vllm_spectralquant.backend.attention.SpectralQuantBackend"
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, cfg("spectralquant_sq3bit")) == ours
    assert CpuPlatform.get_attn_backend_cls(None, cfg("spectralquant_sq3bit")) == ours
    assert "cpu_attn" in CpuPlatform.get_attn_backend_cls(None, cfg("auto"))
    with pytest.raises(ValueError, match="needs the SpectralQuant backend"):
        CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CPU_ATTN, cfg("spectralquant_sq3bit"))
    with pytest.raises(ValueError, match="cannot serve this model: .*head_size"):
        CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, cfg("spectralquant_sq3bit", head_size=20))


def test_nonfinite_kv_at_runtime_stays_in_its_sequence(use_config, tiny_calib_model_dir):
    """K/V with NaN/inf in one sequence: the cache stays finite and other sequences are unaffected."""
    from vllm_spectralquant import ops

    use_config(_fake_config(tiny_calib_model_dir))
    impl = _impl("spectralquant_tq3bit")
    layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    geo = impl.config.geometry(16)
    codec = impl.layer_codec(layer, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(40, 2, 32, generator=gen)
    v = torch.randn(40, 2, 32, generator=gen)
    bad_k, bad_v = k.clone(), v.clone()
    bad_k[0, 1, 3] = float("nan")  # the sink token of sequence 0
    bad_k[5, 0, :] = float("inf")
    bad_v[7, 1, 2] = float("-inf")
    slots = torch.cat([torch.arange(20), 32 + torch.arange(20)])  # seq 0 in block 0-1, seq 1 in blocks 2-3
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    q = torch.randn(2, 4, 32, generator=gen)
    outs = []
    for kk, vv in ((k, v), (bad_k, bad_v)):
        cache = torch.zeros(4, 2, 16, geo.page_slot_bytes, dtype=torch.uint8)
        impl.do_kv_cache_update(layer, kk, vv, cache, slots)
        out = torch.empty(2, 4, 32)
        ops.decode_attention(q, cache, bt, torch.tensor([20, 20], dtype=torch.int32), codec, geo, impl.scale, out)
        outs.append(out)
    assert torch.isfinite(outs[1]).all()
    assert torch.equal(outs[0][1], outs[1][1])  # sequence 1 never saw sequence 0's bad values


def test_config_is_pure_and_cached_by_key(tiny_calib_model_dir, tmp_path):
    from vllm_spectralquant.backend.config import ServedModel
    from vllm_spectralquant.artifact.fingerprint import read_config

    a = SpectralQuantConfig.from_cache_dtype("spectralquant_tq3bit", 32)
    assert SpectralQuantConfig.from_cache_dtype("spectralquant_tq3bit", 32) is a
    assert a.artifact is None and a.sink_tokens == 1 and a.geometry(128).slot_bytes == PRESETS["tq3bit"].slot_bytes(32)
    assert SpectralQuantConfig.from_cache_dtype("spectralquant_tq3bit", 32, sink_tokens=2).sink_tokens == 2
    model = ServedModel.from_config(str(tiny_calib_model_dir), read_config(tiny_calib_model_dir), tiny_calib_model_dir)
    sq = SpectralQuantConfig.from_cache_dtype("spectralquant_sq3bit", 32, model=model)
    assert sq.artifact.path == tiny_calib_model_dir / "spectralquant" and sq.artifact.preset == "sq3bit"
    with pytest.raises(ServingConfigError, match="needs a calibration artifact"):
        SpectralQuantConfig.from_cache_dtype("spectralquant_sq3bit", 32)
    SpectralQuantConfig.cache_clear()
    assert SpectralQuantConfig.from_cache_dtype("spectralquant_tq3bit", 32) is not a


def test_customize_spec_before_any_layer_is_built(use_config, tiny_calib_model_dir):
    """With vLLM's config current, the spec needs no impl; without one, it uses the configs the impls derived."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_spectralquant.backend.attention import SpectralQuantBackend

    spec = FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=32, dtype=torch.uint8)
    cfg = _fake_config(tiny_calib_model_dir)
    cfg.cache_config = SimpleNamespace(cache_dtype="spectralquant_tq4bit")
    use_config(cfg)
    assert SpectralQuantBackend.customize_spec(spec).state_content_bytes == PRESETS["tq4bit"].slot_bytes(32) + 1
    use_config(None)
    SpectralQuantConfig.cache_clear()
    with pytest.raises(ServingConfigError, match="no SpectralQuant configuration for head size 32"):
        SpectralQuantBackend.customize_spec(spec)
    use_config(_fake_config(tiny_calib_model_dir))
    _impl("spectralquant_tq2_5bit")
    use_config(None)
    assert SpectralQuantBackend.customize_spec(spec).state_content_bytes == PRESETS["tq2_5bit"].slot_bytes(32) + 1


def test_per_layer_codecs_live_on_the_impl(use_config, tiny_artifact, tiny_calib_model_dir):
    use_config(_fake_config(tiny_calib_model_dir, artifact=str(tiny_artifact.artifact)))
    impls = [_impl() for _ in range(2)]
    layers = [SimpleNamespace(layer_name=f"model.layers.{i}.self_attn.attn") for i in range(2)]
    codecs = [impl.layer_codec(layer, torch.device("cpu")) for impl, layer in zip(impls, layers)]
    assert codecs[0] is impls[0].layer_codec(layers[0], torch.device("cpu"))
    assert not torch.equal(codecs[0].key.basis, codecs[1].key.basis)
    assert impls[0].config is impls[1].config  # one configuration, one loaded artifact


def test_backend_refuses_a_soft_capped_model_with_the_calibration_message(use_config, tmp_path, text_corpus):
    """A Gemma3-like model with soft-capped scores: the server's refusal is word for word calibration's."""
    from transformers import Gemma3TextConfig

    from vllm_spectralquant.calibrate.job import CalibrationConfig, calibrate
    from vllm_spectralquant.models.errors import ModelError

    model = tmp_path / "gemma3-like"
    Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     num_hidden_layers=6, vocab_size=256, max_position_embeddings=1024, sliding_window=64,
                     attn_logit_softcapping=50.0).save_pretrained(model)
    with pytest.raises(ModelError) as at_calibration:
        calibrate(CalibrationConfig(model_dir=model, corpus=text_corpus, tokens=256, window=128))
    use_config(_fake_config(model))
    with pytest.raises(NotImplementedError) as at_serving:
        _impl("spectralquant_tq3bit", sliding_window=64)  # layer 0 of such a model: a sliding one
    assert str(at_serving.value) == str(at_calibration.value)
    assert str(at_serving.value) == "SpectralQuant KV cache does not support logits soft-capping (attn_logit_softcapping=50.0)"


def test_verify_rows_forward_through_the_decode_path(use_config, tiny_artifact, tiny_calib_model_dir, monkeypatch):
    """Speculative verify rows (1 + k tokens) count as decodes: one decode-kernel call, one row per token."""
    from vllm_spectralquant.backend import attention
    from vllm_spectralquant.backend.attention import SpectralQuantMetadata
    from vllm_spectralquant.format import paged_attention

    use_config(_fake_config(tiny_calib_model_dir, artifact=str(tiny_artifact.artifact)))
    impl = _impl()
    layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    codec = impl.layer_codec(layer, torch.device("cpu"))
    seq_lens, q_lens = [33, 4, 60], [3, 3, 3]
    batch = random_paged_batch(codec, seq_lens, q_lens, block_size=16, num_query_heads=4, seed=11,
                               sink_tokens=impl.config.sink_tokens)
    t = batch.num_tokens
    calls = []
    real = attention.ops.decode_attention

    def recording(query, kv_cache, block_table, seq_lens_, *args, **kw):
        calls.append(seq_lens_.tolist())
        return real(query, kv_cache, block_table, seq_lens_, *args, **kw)

    monkeypatch.setattr(attention.ops, "decode_attention", recording)
    md = SpectralQuantMetadata(
        num_actual_tokens=t, query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens,
        block_table=batch.block_table, slot_mapping=torch.zeros(t, dtype=torch.long), num_decodes=3,
        num_decode_tokens=t, num_prefills=0, query_start_loc_cpu=batch.query_start_loc, seq_lens_cpu=None,
    )  # fmt: skip
    out = torch.full((t, 4, 32), float("nan"))
    impl.forward(layer, batch.query, torch.zeros(t, 2, 32), torch.zeros(t, 2, 32), batch.kv_cache, md, output=out)
    assert calls == [[31, 32, 33, 2, 3, 4, 58, 59, 60]]
    ref = paged_attention(
        batch.query, batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, codec, batch.geometry, 32**-0.5
    )
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_layers_get_the_page_size_calibration_gave_them(use_config, tiny_artifact, tiny_calib_model_dir):
    """An artifact whose layers have their own slot sizes: vLLM's spec loop gets each layer's page, the impl
    stores and attends in it, and a caller that names no layer is refused by name."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_spectralquant.backend.attention import SpectralQuantBackend
    from vllm_spectralquant.backend.vllm_compat import layer_being_specified

    use_config(_fake_config(tiny_calib_model_dir, artifact=str(tiny_artifact.artifact)))
    impl = _impl()
    slots = impl.config.layer_slot_bytes
    assert slots is not None and len(set(slots)) > 1 and sum(slots) == len(slots) * PRESETS["sq3bit"].slot_bytes(32)
    spec = FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=32, dtype=torch.uint8)

    def runner_loop():  # what vLLM's get_kv_cache_spec does: a loop with a layer_name local
        out = {}
        for layer_name in [f"model.layers.{i}.self_attn.attn" for i in range(len(slots))]:
            out[layer_name] = SpectralQuantBackend.customize_spec(spec).state_content_bytes
        return list(out.values())

    spill = -(-impl.config.sink_tokens * 4 * 32 // 128)  # the exact sinks' bytes over 128 offsets
    assert runner_loop() == [s + spill for s in slots]
    assert layer_being_specified() is None
    with pytest.raises(ServingConfigError, match="gives each layer its own slot size"):
        SpectralQuantBackend.customize_spec(spec)

    layer = SimpleNamespace(layer_name="model.layers.2.self_attn.attn")
    cache = torch.zeros(4, 2, 16, impl.config.geometry(16, 2).page_slot_bytes, dtype=torch.uint8)
    k = torch.randn(20, 2, 32)
    impl.do_kv_cache_update(layer, k, k, cache, torch.arange(20))
    assert (cache[..., : slots[2]] != 0).any() and impl.layer_codec(layer, torch.device("cpu")).slot_bytes == slots[2]
