"""vLLM attention backend on the packed SpectralQuant cache: backend + metadata builder + impl.

Per layer and step, vLLM calls ``do_kv_cache_update`` (pack the new tokens into their slots), then
``forward``. The batch is reordered decodes first (reorder threshold 1):

* decodes attend over the packed cache (``ops.decode_attention``; sliding-window layers over their
  last ``sliding_window`` tokens only, since vLLM frees the blocks before it). With speculative
  decoding a decode row holds the draft tokens too (up to ``1 + num_speculative_tokens`` query
  tokens); each token becomes a one-token decode row (``decode_rows``), so verification runs the
  same kernel and arithmetic as plain decoding;
* a first prefill chunk (query length == sequence length) attends over its raw K/V;
* continuation chunks and prefix-cache hits attend over the packed cached context plus the chunk's
  raw K/V, tile by tile in bounded memory (``prefill.prefill_attention``).

All packed-cache work goes through ``vllm_spectralquant.ops`` (CUDA > Triton > torch).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout, SlidingWindowSpec

from vllm_spectralquant import ops
from vllm_spectralquant.backend.config import SpectralQuantConfig, served_model
from vllm_spectralquant.backend.decode_rows import expand_decode_rows
from vllm_spectralquant.backend.prefill import prefill_attention
from vllm_spectralquant.backend.tensor_parallel import check_rank_slice, current_rank
from vllm_spectralquant.backend.vllm_compat import layer_being_specified
from vllm_spectralquant.emulation import EMULATED_KV_CACHE_DTYPES
from vllm_spectralquant.format.paged import CacheGeometry
from vllm_spectralquant.format.params import LayerCodec
from vllm_spectralquant.format.presets import MAX_HEAD_DIM, MIN_HEAD_DIM, PRESETS, GROUP_SIZE
from vllm_spectralquant.models.shape import unsupported_message

KV_CACHE_DTYPES = [p.kv_cache_dtype for p in PRESETS.values()]
#: Also served: vLLM's own formats emulated on a dense cache (backend/emulated_dense.py).
SERVED_KV_CACHE_DTYPES = KV_CACHE_DTYPES + list(EMULATED_KV_CACHE_DTYPES)


class SpectralQuantBackend(AttentionBackend):
    """Registered in vLLM's CUSTOM slot (it survives spawn/Ray pickling, unlike a new enum name)."""

    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = SERVED_KV_CACHE_DTYPES

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        # vLLM asks while building a layer, under its config: an emulated dtype gets the dense impl.
        from vllm_spectralquant.backend.emulated_dense import EmulatedDenseImpl, emulated_cache_dtype

        return SpectralQuantImpl if emulated_cache_dtype() is None else EmulatedDenseImpl

    @staticmethod
    def get_builder_cls() -> type[SpectralQuantMetadataBuilder]:
        return SpectralQuantMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        # Any block size works; the exact-sink spill costs ceil(4 D sink_tokens / block_size) bytes
        # per head-token, so larger blocks are cheaper (see get_preferred_block_size).
        return [MultipleOf(1)]

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int = 16) -> int:
        return max(default_block_size, 128)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(range(MIN_HEAD_DIM, MAX_HEAD_DIM + 1, GROUP_SIZE))

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Kernels index through kv_cache.stride(); both token-major and head-major pages work.
        return (KVCacheLayout.LBHNC, KVCacheLayout.LBNHC)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True  # the window is applied in attention; the layer's cache stays packed

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False  # the packed layout is not what KV connectors (LMCache, NIXL) expect

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Make vLLM allocate packed bytes per head-token (slot + sink spill) for our layers."""
        if spec.dtype != torch.uint8:
            return spec
        from vllm_spectralquant.backend.emulated_dense import emulated_cache_dtype, page_entry_bytes

        if emulated_cache_dtype(spec.head_size) is not None:
            return replace(spec, state_content_bytes=page_entry_bytes(spec.head_size))
        config = SpectralQuantConfig.for_spec(spec.head_size)
        # vLLM probes sliding-window layers with a 1-token block to learn their bytes per token, then
        # picks their real block size and asks again. A block holds at least the sinks, so the probe is
        # answered for the smallest block that can (the final call still gets the exact check).
        probe_block = max(spec.block_size, config.sink_tokens) if isinstance(spec, SlidingWindowSpec) else spec.block_size
        # An artifact whose layers have their own slot sizes needs the layer vLLM is sizing; with one
        # size per layer vLLM groups the layers as UniformTypeKVCacheSpecs (one block table, own pages).
        layer = layer_being_specified() if config.layer_slot_bytes is not None else None
        geometry = config.geometry(probe_block, layer)
        return replace(spec, state_content_bytes=geometry.page_slot_bytes)


@dataclass
class SpectralQuantMetadata:
    num_actual_tokens: int
    query_start_loc: torch.Tensor  # [B + 1] int32, device
    seq_lens: torch.Tensor  # [B] int32, device
    block_table: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64
    num_decodes: int
    num_decode_tokens: int
    num_prefills: int
    query_start_loc_cpu: torch.Tensor  # [B + 1]
    seq_lens_cpu: torch.Tensor | None  # [B]; None for pure-decode batches (no host copy needed)
    workspace: object | None = None  # ops.DecodeWorkspace preallocated by the builder (CUDA)


class SpectralQuantMetadataBuilder(AttentionMetadataBuilder[SpectralQuantMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        # The CUDA kernels are capture-safe (no host sync, fixed grid per batch shape, preallocated
        # workspace) and multi-token decode rows are expanded with device ops only, so uniform
        # decode batches (one token, or 1 + k with speculation) can be captured as FULL graphs.
        # The Triton and torch paths are not promised to be.
        from vllm_spectralquant.ops import cuda_ext

        if getattr(kv_cache_spec, "sliding_window", None) is not None:
            return AttentionCGSupport.NEVER  # windowed decode runs on Triton (no window in the CUDA kernel)
        if torch.cuda.is_available() and cuda_ext.is_available():
            return AttentionCGSupport.UNIFORM_BATCH
        return AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # With speculation, verify rows (1 + k tokens) count as decodes: they take the decode kernel.
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=True)
        self.workspace = None
        if torch.device(device).type == "cuda":
            # One decode workspace for every layer (they run one after another), sized for the
            # largest batch (in decode rows: one per query token) before any CUDA graph is
            # captured, so decode never allocates.
            from vllm_spectralquant.ops.workspace import DecodeWorkspace

            model = vllm_config.model_config
            self.workspace = DecodeWorkspace.for_shapes(
                device,
                vllm_config.scheduler_config.max_num_seqs * self.reorder_batch_threshold,
                model.get_num_attention_heads(vllm_config.parallel_config),
                kv_cache_spec.num_kv_heads,
                kv_cache_spec.head_size,
            )

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False) -> SpectralQuantMetadata:
        cam = common_attn_metadata
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(
            cam, decode_threshold=self.reorder_batch_threshold
        )
        # Prefill rows need their lengths on the host (to pick first chunks and size the gathers).
        seq_lens_cpu = cam.seq_lens.cpu() if num_prefills else None
        return SpectralQuantMetadata(
            num_actual_tokens=cam.num_actual_tokens,
            query_start_loc=cam.query_start_loc,
            seq_lens=cam.seq_lens,
            block_table=cam.block_table_tensor,
            slot_mapping=cam.slot_mapping,
            num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens,
            num_prefills=num_prefills,
            query_start_loc_cpu=cam.query_start_loc_cpu,
            seq_lens_cpu=seq_lens_cpu,
            workspace=self.workspace,
        )


def refuse_unsupported_layer(
    alibi_slopes, logits_soft_cap, attn_type, kv_sharing_target_layer_name, extra: dict, sliding_window: int | None = None
) -> None:
    """Raise NotImplementedError naming every attention feature of this layer our impls do not serve.

    ``sliding_window`` is refused only where the caller passes it (the packed impl serves windows).
    """
    unsupported = {
        "ALiBi": alibi_slopes is not None,
        "sliding-window attention": sliding_window is not None,
        "logits soft-capping": logits_soft_cap not in (None, 0),
        f"{getattr(attn_type, 'value', attn_type)} attention (only decoder self-attention)": attn_type != AttentionType.DECODER,
        "KV sharing between layers": kv_sharing_target_layer_name is not None,
        "attention sinks (learned)": extra.get("sinks") is not None,
    }
    bad = [name for name, hit in unsupported.items() if hit]
    if bad:
        raise NotImplementedError(unsupported_message(bad))


class SpectralQuantImpl(AttentionImpl[SpectralQuantMetadata]):
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

        vllm_config = get_current_vllm_config_or_none()
        if vllm_config is not None:
            # The whole model first: what calibration refuses, in the same words (models/shape.py).
            refusal = served_model(vllm_config.model_config).shape.serving_refusal()
            if refusal:
                raise NotImplementedError(refusal)
        refuse_unsupported_layer(alibi_slopes, logits_soft_cap, attn_type, kv_sharing_target_layer_name, extra)
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"the SpectralQuant backend serves kv-cache dtypes {KV_CACHE_DTYPES}, got {kv_cache_dtype!r} "
                "(layers kept at full precision are not supported yet)"
            )
        if vllm_config is None:
            raise RuntimeError("SpectralQuant: the attention layer was built outside a vLLM config context")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        # vLLM's convention: the query at position p attends p - sliding_window + 1 .. p (None: all of them).
        self.sliding_window = sliding_window
        self.config = SpectralQuantConfig.from_vllm_config(vllm_config, head_size, kv_cache_dtype)
        artifact = self.config.load_artifact()  # verified at startup: a bad artifact fails here, naming the cause
        total_kv_heads = served_model(vllm_config.model_config).shape.num_kv_heads
        rank, world = current_rank()
        artifact_heads = artifact.manifest.model.num_kv_heads if artifact is not None else total_kv_heads
        heads = check_rank_slice(rank, world, self.num_kv_heads, total_kv_heads, artifact_heads)
        self.kv_head_offset = heads.start
        self._layer: int | None = None
        self._codecs: dict[str, LayerCodec] = {}  # this layer's codec, per device

    def layer_codec(self, layer: torch.nn.Module, device: torch.device) -> LayerCodec:
        """This impl's layer's codec on ``device`` (the layer index comes from the Attention module's name)."""
        if self._layer is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self._layer = extract_layer_index(layer.layer_name)
        codec = self._codecs.get(str(device))
        if codec is None:
            codec = self.config.layer_codec(self._layer, self.num_kv_heads, self.kv_head_offset).to(device)
            self._codecs[str(device)] = codec
        return codec

    def _geometry(self, kv_cache: torch.Tensor, codec: LayerCodec):
        # The codec knows its layer's slot size (calibration may give each layer its own).
        return CacheGeometry.for_codec(codec, kv_cache.shape[2], self.config.sink_tokens)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if kv_cache.numel() == 0:
            return
        codec = self.layer_codec(layer, kv_cache.device)
        ops.store_kv(key, value, kv_cache, slot_mapping, codec, self._geometry(kv_cache, codec))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None, output_scale=None, output_block_scale=None):
        assert output is not None, "the SpectralQuant backend writes into vLLM's output buffer"
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantisation is not supported by the SpectralQuant backend")
        if attn_metadata is None:  # profiling / compile warm-up: no cache yet
            return output.fill_(0)
        md = attn_metadata
        codec = self.layer_codec(layer, kv_cache.device)
        geometry = self._geometry(kv_cache, codec)
        if md.num_decodes:
            nd = md.num_decode_tokens
            block_table, seq_lens = md.block_table, md.seq_lens[: md.num_decodes]
            if nd > md.num_decodes:  # speculative verify rows: one decode row per query token
                rows = expand_decode_rows(md.query_start_loc, md.seq_lens, md.block_table, md.num_decodes, nd)
                block_table, seq_lens = rows.block_table, rows.seq_lens
            ops.decode_attention(
                query[:nd], kv_cache, block_table, seq_lens, codec, geometry, self.scale, output[:nd],
                workspace=md.workspace, window=self.sliding_window,
            )
        if md.num_prefills:
            self._prefills(query, key, value, kv_cache, md, codec, geometry, output)
        return output

    def _prefills(self, query, key, value, kv_cache, md, codec, geometry, output) -> None:
        qsl = md.query_start_loc_cpu.tolist()
        lens = md.seq_lens_cpu.tolist()
        for r in range(md.num_decodes, md.num_decodes + md.num_prefills):
            start, end = qsl[r], qsl[r + 1]
            q_len, seq_len = end - start, lens[r]
            k_new, v_new = key[start:end], value[start:end]
            cached = seq_len - q_len
            if cached > 0 or self.sliding_window is not None:
                # A continuation chunk or prefix-cache hit (the cached context is packed), or a
                # sliding-window layer (a band, not a plain causal mask): tiled, bounded memory, and
                # never a read of a block that slid out of the window.
                o = prefill_attention(
                    query[start:end], k_new, v_new, kv_cache, md.block_table[r], cached, codec, geometry, self.scale,
                    window=self.sliding_window,
                )
            else:
                o = causal_attention(query[start:end], k_new, v_new, self.scale)
            output[start:end] = o.to(output.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """A first prefill chunk: q [n, Hq, D] over its own raw k, v [n, H, D] (GQA), causal.

    4-D inputs, ``is_causal`` (never a materialised mask) and native GQA keep torch on its flash /
    memory-efficient kernels: O(n) memory, as vLLM's memory profiling assumes.
    """
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)
