"""Post-RoPE Q/K/V capture through transformers' attention interface, and model loading checks."""

from __future__ import annotations

import time

import pytest
import torch

from vllm_spectralquant.models.capture import (
    CAPTURE_ATTN_IMPLEMENTATION,
    QKVCapture,
    check_supported_architecture,
    load_model,
    run_with_capture,
)
from vllm_spectralquant.models.errors import ModelError


class Recorder:
    """on_qkv callback that keeps every call: {layer_idx: (q, k, v)} plus the call order."""

    def __init__(self):
        self.calls: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.order: list[int] = []

    def __call__(self, layer_idx, q, k, v):
        self.order.append(layer_idx)
        self.calls[layer_idx] = (q, k, v)


def stock_logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False, **kwargs).logits.float()


def random_ids(batch=2, tokens=24, vocab=256, seed=1):
    return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def test_capture_leaves_logits_unchanged_and_reports_every_layer(tiny_llama):
    ids = random_ids()
    expected = stock_logits(tiny_llama, ids)
    recorder = Recorder()
    logits = run_with_capture(tiny_llama, ids, recorder)
    assert logits.dtype == torch.float32 and logits.shape == (2, 24, 256)
    assert (logits - expected).abs().max().item() <= 1e-5
    assert recorder.order == [0, 1]
    for q, k, v in recorder.calls.values():
        assert q.shape == (2, 24, 4, 16) and k.shape == (2, 24, 2, 16) and v.shape == (2, 24, 2, 16)
        assert q.dtype == k.dtype == v.dtype == torch.float32 and q.is_contiguous()
    assert tiny_llama.config._attn_implementation == "sdpa"  # restored


def test_captured_tensors_are_post_rope_token_major(tiny_llama):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ids = random_ids(batch=1, tokens=10)
    positions = torch.arange(100, 110)[None]
    recorder = Recorder()
    run_with_capture(tiny_llama, ids, recorder, position_ids=positions)

    # Recompute layer 0 by hand: embeddings -> RMSNorm -> projections -> RoPE.
    model, attn = tiny_llama.model, tiny_llama.model.layers[0].self_attn
    with torch.no_grad():
        hidden = model.layers[0].input_layernorm(model.embed_tokens(ids))
        cos, sin = model.rotary_emb(hidden, positions)
        q = attn.q_proj(hidden).view(1, 10, 4, 16).transpose(1, 2)
        k = attn.k_proj(hidden).view(1, 10, 2, 16).transpose(1, 2)
        v = attn.v_proj(hidden).view(1, 10, 2, 16)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k, got_v = recorder.calls[0]
    torch.testing.assert_close(got_q, q.transpose(1, 2))
    torch.testing.assert_close(got_k, k.transpose(1, 2))
    torch.testing.assert_close(got_v, v)


def test_position_offset_keeps_logits_but_rotates_keys(tiny_llama):
    ids = random_ids(batch=1, tokens=32)
    at_zero, at_offset = Recorder(), Recorder()
    logits_zero = run_with_capture(tiny_llama, ids, at_zero)
    logits_offset = run_with_capture(tiny_llama, ids, at_offset, position_ids=torch.arange(400, 432))
    # RoPE scores depend on relative positions only: same logits up to fp32 rounding of the larger angles.
    assert (logits_offset - logits_zero).abs().max().item() < 1e-4
    for layer in (0, 1):
        _, k0, v0 = at_zero.calls[layer]
        _, k1, v1 = at_offset.calls[layer]
        assert (k1 - k0).abs().max().item() > 0.1  # keys rotated as at positions 400..431
        torch.testing.assert_close(v1, v0, atol=1e-5, rtol=1e-5)  # values carry no position


def test_position_ids_are_checked(tiny_llama):
    ids = random_ids(batch=1, tokens=8)
    with pytest.raises(ValueError, match=r"reach 512.*max_position_embeddings=512"):
        run_with_capture(tiny_llama, ids, None, position_ids=torch.arange(505, 513))
    with pytest.raises(ValueError, match="do not match"):
        run_with_capture(tiny_llama, ids, None, position_ids=torch.arange(7))
    with pytest.raises(ValueError, match="integer tensor"):
        run_with_capture(tiny_llama, ids.float(), None)


def test_kv_transform_replaces_kv_before_attention(tiny_llama):
    ids = random_ids()
    expected = stock_logits(tiny_llama, ids)
    seen = []

    def identity(layer_idx, k, v):
        seen.append((layer_idx, k.shape, v.shape))
        return k, v

    logits = run_with_capture(tiny_llama, ids, None, kv_transform=identity)
    assert (logits - expected).abs().max().item() <= 1e-5
    assert seen == [(0, (2, 24, 2, 16), (2, 24, 2, 16)), (1, (2, 24, 2, 16), (2, 24, 2, 16))]

    # A lossy transform must change the output, and on_qkv still sees the K/V the model computed.
    recorder = Recorder()
    noisy = run_with_capture(
        tiny_llama, ids, recorder, kv_transform=lambda i, k, v: (k.round(decimals=1), torch.zeros_like(v))
    )
    assert (noisy - expected).abs().max().item() > 1e-3
    assert recorder.calls[0][2].abs().max().item() > 0

    with pytest.raises(ValueError, match="kv_transform for layer 0 returned k of shape"):
        run_with_capture(tiny_llama, ids, None, kv_transform=lambda i, k, v: (k[:, :-1], v))
    assert tiny_llama.config._attn_implementation == "sdpa"  # restored after the error too


def test_capture_context_honours_padding_masks(tiny_llama):
    ids = random_ids(batch=2, tokens=12)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding in the first row
    expected = stock_logits(tiny_llama, ids, attention_mask=mask)
    recorder = Recorder()
    with QKVCapture(tiny_llama, on_qkv=recorder) as capture, torch.no_grad():
        assert tiny_llama.config._attn_implementation == CAPTURE_ATTN_IMPLEMENTATION
        logits = tiny_llama(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert capture.layers_seen == [0, 1]
    torch.testing.assert_close(logits[:, 5:], expected[:, 5:], atol=1e-5, rtol=0)
    assert tiny_llama.config._attn_implementation == "sdpa"


def test_qwen2_with_qkv_bias():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=128, vocab_size=256, max_position_embeddings=512,
    )
    model = Qwen2ForCausalLM(config).eval()
    assert model.model.layers[0].self_attn.k_proj.bias is not None
    check_supported_architecture(model.config)
    ids = random_ids()
    recorder = Recorder()
    logits = run_with_capture(model, ids, recorder)
    assert (logits - stock_logits(model, ids)).abs().max().item() <= 1e-5
    assert recorder.calls[1][1].shape == (2, 24, 2, 16)


def test_model_that_cannot_switch_attention_is_refused(tiny_llama, monkeypatch):
    monkeypatch.setattr(type(tiny_llama), "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(ModelError, match="AttentionInterface"):
        run_with_capture(tiny_llama, random_ids(), Recorder())


def test_load_model(tiny_llama_dir):
    model, tokenizer = load_model(tiny_llama_dir)
    assert not model.training and model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    ids = torch.tensor([tokenizer("hello world").input_ids])
    assert run_with_capture(model, ids, None).shape == (1, 11, 256)


def test_load_model_errors(tmp_path):
    from transformers import DeepseekV3Config, GPT2Config

    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path)
    cases = {
        "mla": (DeepseekV3Config(), "multi-head latent attention"),
        "gpt2": (GPT2Config(), "no rotary position embedding"),
    }
    for name, (config, message) in cases.items():
        config.save_pretrained(tmp_path / name)
        with pytest.raises(ModelError, match=message):
            load_model(tmp_path / name)


def test_architecture_checks_accept_sliding_windows_and_refuse_soft_capping():
    from transformers import FalconConfig, Gemma2Config, Gemma3TextConfig, MistralConfig, Qwen2Config

    check_supported_architecture(Qwen2Config(sliding_window=4096, use_sliding_window=False))
    check_supported_architecture(MistralConfig(sliding_window=None))
    # Sliding-window layers (alone or mixed with full ones) are served; Gemma 2's soft-capping is not.
    check_supported_architecture(MistralConfig(sliding_window=4096))
    check_supported_architecture(Gemma3TextConfig())
    with pytest.raises(ModelError, match=r"^SpectralQuant KV cache does not support logits soft-capping \(attn_logit_softcapping=50.0\)$"):
        check_supported_architecture(Gemma2Config())
    with pytest.raises(ModelError, match="ALiBi"):
        check_supported_architecture(FalconConfig(alibi=True))


# ---- the real model ----


@pytest.mark.slow
def test_smollm2_capture_matches_stock_model(smollm2_fp32, lee_ids):
    model, _ = smollm2_fp32
    ids = lee_ids[:512][None]
    started = time.perf_counter()
    expected = stock_logits(model, ids)
    recorder = Recorder()
    logits = run_with_capture(model, ids, recorder)
    max_diff = (logits - expected).abs().max().item()
    print(f"\nSmolLM2 fp32 logits, capture vs stock: max |diff| {max_diff:.2e} ({time.perf_counter() - started:.1f} s)")
    assert max_diff <= 1e-5
    assert recorder.order == list(range(30))
    q, k, v = recorder.calls[29]
    assert q.shape == (1, 512, 9, 64) and k.shape == (1, 512, 3, 64) and v.shape == (1, 512, 3, 64)


@pytest.mark.slow
def test_smollm2_position_offset(smollm2_fp32, lee_ids):
    model, _ = smollm2_fp32
    ids = lee_ids[512:768][None]
    at_zero, at_offset = Recorder(), Recorder()
    logits_zero = run_with_capture(model, ids, at_zero)
    logits_offset = run_with_capture(model, ids, at_offset, position_ids=torch.arange(7000, 7256))
    logit_diff = (logits_offset - logits_zero).abs().max().item()
    key_diff = (at_offset.calls[10][1] - at_zero.calls[10][1]).abs().max().item()
    print(f"\nSmolLM2 positions 7000.. vs 0..: logits max |diff| {logit_diff:.2e}, "
          f"layer-10 keys max |diff| {key_diff:.1f}")
    assert logit_diff < 5e-2
    assert key_diff > 1.0
