"""The dense cache that serves emulated formats (``spectralquant_emulate_*``): K/V stored dequantised.

Each new K/V is rounded at store time by the emulated format (``emulated_formats.roundtrip``) and kept
as float32 in the page (vLLM allocates the page as uint8: ``2 * head_dim * 4`` bytes per head-token, a
container that holds fp32, bf16 and fp16 values exactly; the format's real bytes are what
``emulated_formats`` reports, so capacity for these methods is analytic). Attention follows the
packed SpectralQuant path, so methods are compared on the same schedule:

* decodes attend over the cache (their own token included, already rounded);
* a prefill chunk attends over the cached (rounded) context plus its own raw K/V, as vLLM's
  TurboQuant continuation prefill does (``_continuation_prefill``).

Layers that vLLM keeps uncompressed for the format (TurboQuant's boundary skip) store K/V unrounded.
The backend logs one line per format with the bytes per head-token averaged over layers, which
``spectralquant eval`` reads.
"""

from __future__ import annotations

import logging
import threading

import torch

from vllm.v1.attention.backend import AttentionImpl, AttentionType

from vllm_spectralquant.backend import emulated_formats
from vllm_spectralquant.emulation import EMULATED_DTYPE_PREFIX, get_emulated

logger = logging.getLogger("vllm.spectralquant")

#: The page holds K then V of one head-token as this dtype.
CONTAINER_DTYPE = torch.float32

_lock = threading.Lock()
_built: dict[int, str] = {}  # head size -> emulated kv-cache dtype of the impls built in this process
_logged: set[str] = set()


def emulated_cache_dtype(head_size: int | None = None) -> str | None:
    """The emulated kv-cache dtype of this run (None: not an emulated run).

    From vLLM's current config when there is one; else, given ``head_size``, from the impls built in
    this process (vLLM calls ``customize_spec`` in the worker with no config current, after the
    model's layers exist).
    """
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    dtype = getattr(getattr(cfg, "cache_config", None), "cache_dtype", None)
    if isinstance(dtype, str) and dtype.startswith("spectralquant_"):
        return dtype if dtype.startswith(EMULATED_DTYPE_PREFIX) else None
    if head_size is None:
        return None
    with _lock:
        return _built.get(head_size)


def page_entry_bytes(head_size: int) -> int:
    """Bytes vLLM allocates per head-token of the dense container (K and V)."""
    return 2 * head_size * CONTAINER_DTYPE.itemsize


def bytes_log_line(kv_cache_dtype: str, mean_bytes: float, num_layers: int, skipped: list[int]) -> str:
    """The line ``spectralquant eval`` parses (``EMULATED_BYTES_RE`` in evaluation/run.py)."""
    kept = f"layers {skipped} kept at full precision" if skipped else "every layer compressed"
    return f"SpectralQuant emulation: {kv_cache_dtype} {mean_bytes:.3f} B per head-token over {num_layers} layers ({kept})"


class EmulatedDenseImpl(AttentionImpl):
    """Attention for an emulated format over a dense float32 cache ``[blocks, kv_heads, block_size, 2 * D]``."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra,
    ) -> None:
        from vllm.config import get_current_vllm_config_or_none

        from vllm_spectralquant.backend.attention import refuse_unsupported_layer

        refuse_unsupported_layer(alibi_slopes, logits_soft_cap, attn_type, kv_sharing_target_layer_name, extra, sliding_window)
        vllm_config = get_current_vllm_config_or_none()
        if vllm_config is None:
            raise RuntimeError("SpectralQuant emulation: the attention layer was built outside a vLLM config context")
        self.method = get_emulated(kv_cache_dtype)
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        model_config = vllm_config.model_config
        self.skipped_layers = set(emulated_formats.full_precision_layers(self.method, model_config))
        self._layer: int | None = None
        with _lock:
            other = _built.setdefault(head_size, kv_cache_dtype)
            first = kv_cache_dtype not in _logged
            _logged.add(kv_cache_dtype)
        if other != kv_cache_dtype:
            raise ValueError(f"layers of head size {head_size} ask for different emulated caches {other} and {kv_cache_dtype}")
        if first:
            num_layers = model_config.hf_text_config.num_hidden_layers
            skipped = sorted(self.skipped_layers)
            mean = emulated_formats.mean_bytes_per_head_token(self.method, head_size, num_layers, skipped)
            logger.info(bytes_log_line(kv_cache_dtype, mean, num_layers, skipped) + f"; {self.method.description}")

    def _compressed(self, layer) -> bool:
        if self._layer is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self._layer = extract_layer_index(layer.layer_name)
        return self._layer not in self.skipped_layers

    def _pages(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """The uint8 cache ``[B, H, bs, 2 * D * 4]`` viewed as float32 ``[B, H, bs, 2 * D]``."""
        return kv_cache.view(CONTAINER_DTYPE)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if kv_cache.numel() == 0:
            return
        n = slot_mapping.shape[0]
        k, v = key[:n], value[:n]
        if self._compressed(layer):
            k, v = emulated_formats.roundtrip(self.method, k, v)
        pages = self._pages(kv_cache)
        bs = pages.shape[2]
        slots = slot_mapping.long()
        valid = slots >= 0
        blocks, offsets = slots[valid] // bs, slots[valid] % bs
        entry = torch.cat([k[valid], v[valid]], dim=-1).to(CONTAINER_DTYPE)  # [n, H, 2D]
        pages[blocks, :, offsets, :] = entry

    def _context(self, pages: torch.Tensor, block_row: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [length, H, D] of one sequence from its block-table row."""
        bs = pages.shape[2]
        nblocks = -(-length // bs)
        seq = pages[block_row[:nblocks].long()]  # [nb, H, bs, 2D]
        seq = seq.transpose(1, 2).reshape(nblocks * bs, pages.shape[1], pages.shape[3])[:length]  # explicit: a first chunk has 0 blocks
        return seq[..., : self.head_size], seq[..., self.head_size :]

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None, output_scale=None, output_block_scale=None):
        # Plain float32 attention of the last q_len positions (an [n, L] mask: fine at eval sizes on CPU).
        from vllm_spectralquant.format.reference_attention import dense_causal_attention

        assert output is not None, "the SpectralQuant backend writes into vLLM's output buffer"
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantisation is not supported by the SpectralQuant backend")
        if attn_metadata is None:  # profiling / compile warm-up: no cache yet
            return output.fill_(0)
        md = attn_metadata
        pages = self._pages(kv_cache)
        qsl = md.query_start_loc_cpu.tolist()
        lens = (md.seq_lens_cpu if md.seq_lens_cpu is not None else md.seq_lens.cpu()).tolist()
        for r in range(md.num_decodes + md.num_prefills):
            start, end = qsl[r], qsl[r + 1]
            q_len, seq_len = end - start, lens[r]
            if r < md.num_decodes:  # decode: the cache holds every token, its own included
                k_all, v_all = self._context(pages, md.block_table[r], seq_len)
            else:
                cached = seq_len - q_len
                k_ctx, v_ctx = self._context(pages, md.block_table[r], cached)
                k_all = torch.cat([k_ctx.to(key.dtype), key[start:end]])
                v_all = torch.cat([v_ctx.to(value.dtype), value[start:end]])
            o = dense_causal_attention(query[start:end], k_all, v_all, self.scale)
            output[start:end] = o.to(output.dtype)
        return output
