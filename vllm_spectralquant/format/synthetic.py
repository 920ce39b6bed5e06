"""Random but valid SpectralQuant codecs, for tests and speed-only benchmarks (never for quality claims)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vllm_spectralquant.format.codebooks import gaussian_lloyd_max, pad_codebook
from vllm_spectralquant.format.paged import CacheGeometry
from vllm_spectralquant.format.params import ComponentCodec, LayerCodec
from vllm_spectralquant.format.presets import GROUP_SIZE, MAX_BITS, Preset
from vllm_spectralquant.format.turboquant import turboquant_codec


def random_bits(num_kv_heads: int, groups: int, budget: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (key bits, value bits) int32 [H, G] per head, using at most ``budget`` code bytes."""
    k_bits = torch.zeros(num_kv_heads, groups, dtype=torch.int32)
    v_bits = torch.zeros_like(k_bits)
    for h in range(num_kv_heads):
        flat = torch.zeros(2 * groups, dtype=torch.int32)
        spend = budget - int(torch.randint(0, 3, (1,), generator=gen))  # sometimes leave bytes unused
        for _ in range(max(spend, 0)):
            open_ = torch.nonzero(flat < MAX_BITS).squeeze(-1)
            flat[open_[torch.randint(len(open_), (1,), generator=gen)]] += 1
        k_bits[h], v_bits[h] = flat[:groups], flat[groups:]
    return k_bits, v_bits


def named_random_codec(name: str, head_dim: int, num_kv_heads: int, seed: int = 0) -> LayerCodec:
    """:func:`random_codec` from a kernel-case name ``preset[:sorted][@slot_bytes][+gain]`` (``sq2_5bit:sorted@22``;
    ``+gain``: random decode gains on the keys, as a calibration writes)."""
    from vllm_spectralquant.format.presets import get_preset

    name, plus, extra = name.partition("+")
    if plus and extra != "gain":
        raise ValueError(f"unknown kernel-case suffix +{extra}")
    name, _, slot = name.partition("@")
    preset, _, order = name.partition(":")
    return random_codec(
        get_preset(preset), head_dim, num_kv_heads, seed=seed, widest_first=order == "sorted",
        slot_bytes=int(slot) if slot else None, key_gain=bool(plus),
    )  # fmt: skip


def random_codec(
    preset: Preset, head_dim: int, num_kv_heads: int, seed: int = 0, widest_first: bool = False, slot_bytes: int | None = None,
    key_gain: bool = False,
) -> LayerCodec:
    """A valid codec with random orthonormal bases, means, scales and bit allocations.

    ``widest_first``: each head's key and value groups get their random bits sorted in descending
    order, the shape of a calibrated allocation (groups follow PCA importance).
    ``slot_bytes``: the layer's own slot size (a calibration that moved bytes between layers); SpectralQuant only.
    ``key_gain``: the keys get random decode gains in [0.8, 1.2] (far larger than calibration's, so a
    kernel that ignores or misplaces them fails its check).
    """
    if preset.method == "turboquant":
        return turboquant_codec(preset, head_dim, num_kv_heads)
    gen = torch.Generator().manual_seed(seed)
    groups = head_dim // GROUP_SIZE
    data = preset.data_bytes(head_dim) if slot_bytes is None else slot_bytes - preset.meta_bytes
    k_bits, v_bits = random_bits(num_kv_heads, groups, data, gen)
    if widest_first:
        k_bits = torch.sort(k_bits, dim=-1, descending=True).values.contiguous()
        v_bits = torch.sort(v_bits, dim=-1, descending=True).values.contiguous()

    def component(bits: torch.Tensor, mode) -> ComponentCodec:
        basis = torch.linalg.qr(torch.randn(num_kv_heads, head_dim, head_dim, generator=gen, dtype=torch.float64))[0]
        cbs = torch.stack(
            [torch.stack([pad_codebook(gaussian_lloyd_max(int(b))[0]) for b in row]) for row in bits]
        )
        return ComponentCodec(
            basis=basis.float(),
            mean=torch.randn(num_kv_heads, head_dim, generator=gen),
            scale=0.2 + torch.rand(num_kv_heads, head_dim, generator=gen) * 2,
            bits=bits,
            codebooks=cbs,
            token_scale=mode,
        )

    k_mode, v_mode = preset.token_scales
    key = component(k_bits, k_mode)
    if key_gain:
        key = replace(key, gain=0.8 + 0.4 * torch.rand(num_kv_heads, generator=gen))
    return LayerCodec(preset, key, component(v_bits, v_mode), slot_bytes).validate()


@dataclass
class PagedBatch:
    """A random mixed batch in vLLM's paged terms, its cache already holding every context token."""

    query: torch.Tensor  # float32 [T_padded, Hq, D]
    kv_cache: torch.Tensor  # uint8 [num_blocks, H, block_size, page_slot_bytes]
    block_table: torch.Tensor  # int32 [B, max_blocks]
    seq_lens: torch.Tensor  # int32 [B]
    query_start_loc: torch.Tensor  # int32 [B + 1]
    keys: list[torch.Tensor]  # per sequence float32 [seq_len, H, D] (what was stored)
    values: list[torch.Tensor]
    geometry: CacheGeometry

    @property
    def num_tokens(self) -> int:
        return int(self.query_start_loc[-1])


def random_paged_batch(
    codec: LayerCodec,
    seq_lens: list[int],
    query_lens: list[int],
    *,
    block_size: int = 16,
    num_query_heads: int | None = None,
    sink_tokens: int | None = None,
    padding_tokens: int = 0,
    extra_blocks: int = 3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> PagedBatch:
    """Random K/V stored through ``store_kv`` into shuffled blocks of a cache full of random bytes.

    Keys get a per-head offset and unequal per-dimension scales (so means, bases and token scales
    all matter); queries are N(0, 1). Blocks are assigned in a random permutation.
    """
    from vllm_spectralquant.format.paged import store_kv

    gen = torch.Generator().manual_seed(seed)
    h, d = codec.num_kv_heads, codec.head_dim
    hq = num_query_heads or h
    geometry = CacheGeometry.for_codec(codec, block_size, sink_tokens)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(blocks_per_seq, default=1)
    num_blocks = sum(blocks_per_seq) + extra_blocks
    kv_cache = torch.randint(0, 256, (num_blocks, h, block_size, geometry.page_slot_bytes), dtype=torch.uint8, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen)
    # Unused block-table entries hold garbage (as in vLLM); kernels must not read them.
    block_table = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), dtype=torch.int32, generator=gen)
    keys, values, start = [], [], 0
    for b, n in enumerate(seq_lens):
        block_table[b, : blocks_per_seq[b]] = perm[start : start + blocks_per_seq[b]].int()
        start += blocks_per_seq[b]
        k = torch.randn(n, h, d, generator=gen) * (0.5 + torch.rand(d, generator=gen)) + torch.randn(h, d, generator=gen)
        v = torch.randn(n, h, d, generator=gen) * (0.5 + torch.rand(d, generator=gen))
        pos = torch.arange(n)
        slots = block_table[b, pos // block_size].long() * block_size + pos % block_size
        store_kv(k, v, kv_cache, slots, codec, geometry)
        keys.append(k)
        values.append(v)
    qsl = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(query_lens, dtype=torch.int32).cumsum(0)
    query = torch.randn(int(qsl[-1]) + padding_tokens, hq, d, generator=gen)
    dev = torch.device(device)
    return PagedBatch(
        query.to(dev),
        kv_cache.to(dev),
        block_table.to(dev),
        torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        qsl.to(dev),
        keys,
        values,
        geometry,
    )
