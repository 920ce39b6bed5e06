"""Streaming, mergeable calibration statistics (float64 sums), per layer and KV head.

Memory does not grow with tokens: a layer keeps sum(x) and sum(x x^T) for keys and values, the
queries' second moment summed over the query heads of each KV head, and (second pass, once the
bases are known) histograms of the sigma-normalised rotated coordinates per group. Merging two
statistics adds the sums, so sharded calibration gives the same result as one process up to
float64 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_spectralquant.calibrate.sinks import MAX_SINK_TOKENS
from vllm_spectralquant.format.presets import GROUP_SIZE

#: Histogram of normalised coordinates: NBINS equal bins over [-HIST_RANGE, HIST_RANGE] sigmas;
#: values outside fall into the edge bins.
HIST_RANGE = 16.0
NBINS = 4096


def hist_centers() -> torch.Tensor:
    """float64 [NBINS] bin centres of the normalised-coordinate histograms."""
    width = 2 * HIST_RANGE / NBINS
    return -HIST_RANGE + width * (torch.arange(NBINS, dtype=torch.float64) + 0.5)


@dataclass
class MomentStats:
    """count, sum and sum of outer products of vectors [N, H, D], in float64."""

    count: int
    total: torch.Tensor  # [H, D]
    outer: torch.Tensor  # [H, D, D]

    @classmethod
    def zeros(cls, num_heads: int, dim: int) -> MomentStats:
        return cls(0, torch.zeros(num_heads, dim, dtype=torch.float64), torch.zeros(num_heads, dim, dim, dtype=torch.float64))

    def update(self, x: torch.Tensor) -> None:
        """Add vectors x [N, H, D] (any float dtype / device; summed in float64 on CPU)."""
        x = x.detach().to(device="cpu", dtype=torch.float64)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.outer += torch.einsum("nhd,nhe->hde", x, x)

    def merge(self, other: MomentStats) -> MomentStats:
        return MomentStats(self.count + other.count, self.total + other.total, self.outer + other.outer)

    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        """Centered covariance [H, D, D] (population, float64)."""
        m = self.mean()
        cov = self.outer / max(self.count, 1) - torch.einsum("hd,he->hde", m, m)
        return 0.5 * (cov + cov.transpose(-1, -2))

    def second_moment(self) -> torch.Tensor:
        """Uncentered second moment E[x x^T] [H, D, D]."""
        return self.outer / max(self.count, 1)


@dataclass
class AttentionProfile:
    """How one layer attends, per KV head: what turns the cost model's error into a relative one.

    The cost model (allocation.py) leaves out ``sum_t p_t^2`` (the same for every group of a head), but
    it differs between layers: a layer that puts its mass on a few coded tokens passes their errors
    straight into its output. Summed over the scored queries (each query head of the KV head's group,
    causal attention over the window):

    * ``concentration`` [H]: ``sum_t p_t^2`` over every key;
    * ``leading`` [H, LEADING]: the part of it on each of the first LEADING positions, so that the
      exact sink tokens, whose count calibration decides after this pass, can be taken out
      (:meth:`error_scale`);
    * ``energy`` [H]: ``|o|^2``, the attention output's squared norm;
    * ``sink_value_sum`` [H, LEADING + 1, D] and ``sink_mass`` [H, LEADING + 1]: the values of the keys that
      receive at least ``SINK_VALUE_MASS`` of a window's attention (mean over its scored queries), weighted
      by that mass: one row per leading position, the last row for every later position. Their mean is
      the value a head's attention sinks carry (:meth:`sink_value`), which calibration puts on the
      codebook grid (``calibrate/anchor.py``).
    """

    concentration: torch.Tensor  # float64 [H]
    leading: torch.Tensor  # float64 [H, LEADING]
    energy: torch.Tensor  # float64 [H]
    sink_value_sum: torch.Tensor  # float64 [H, LEADING + 1, D]
    sink_mass: torch.Tensor  # float64 [H, LEADING + 1]
    queries: int = 0  # (query head, position) pairs summed

    #: Leading positions recorded one by one: every sink count calibration can choose (sinks.MAX_SINK_TOKENS).
    LEADING = MAX_SINK_TOKENS

    #: A key is a sink when it receives at least this share of its window's attention (mean over the
    #: scored queries of the head's group). Measured on SmolLM2-135M (bench/quality_probe.py, sq2_5bit,
    #: 8 windows): 0.01 / 0.02 / 0.05 anchor 57 / 40 / 29 of 90 heads and give +1.82 / +1.85 / +1.69 %
    #: perplexity (no anchor: +4.42 %); the mid-text sinks there take 0.1-0.35 each.
    SINK_VALUE_MASS = 0.05

    @classmethod
    def zeros(cls, num_kv_heads: int, head_dim: int) -> AttentionProfile:
        def z(*shape):
            return torch.zeros(*shape, dtype=torch.float64)

        n = cls.LEADING + 1
        return cls(z(num_kv_heads), z(num_kv_heads, cls.LEADING), z(num_kv_heads), z(num_kv_heads, n, head_dim), z(num_kv_heads, n))

    #: Queries this early in a window see only a handful of keys (position 1 sees the sink alone) and
    #: say nothing about the long contexts the cache serves.
    FIRST_QUERY = 32

    def update(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> None:
        """q [B, T, Hq, D], k, v [B, T, H, D] of whole windows (post-RoPE, positions 0..T-1 of each)."""
        b, t, hq, d = q.shape
        h = k.shape[2]
        g = hq // h
        first = min(self.FIRST_QUERY, t - 1)
        lead = min(self.LEADING, t)
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        sink_row = torch.arange(t).clamp(max=self.LEADING)  # each leading position its own row, then one row
        for w in range(b):
            for head in range(h):
                qh = q[w, :, head * g : (head + 1) * g].float().transpose(0, 1)  # [g, T, D]
                scores = (qh @ k[w, :, head].float().T) * softmax_scale  # [g, T, T]
                p = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)[:, first:]
                vh = v[w, :, head].float()
                out = p @ vh  # [g, T - first, D]
                p2 = p.square()
                self.concentration[head] += float(p2.sum())
                self.leading[head, :lead] += p2[..., :lead].sum((0, 1)).double().cpu()
                self.energy[head] += float(out.square().sum())
                mass = p.mean((0, 1))  # [T]: the share of the window's attention each key receives
                mass = torch.where(mass >= self.SINK_VALUE_MASS, mass, 0.0)
                self.sink_mass[head].index_add_(0, sink_row, mass.double().cpu())
                self.sink_value_sum[head].index_add_(0, sink_row, (mass[:, None] * vh).double().cpu())
        self.queries += b * g * (t - first)

    def merge(self, other: AttentionProfile) -> AttentionProfile:
        return AttentionProfile(
            self.concentration + other.concentration,
            self.leading + other.leading,
            self.energy + other.energy,
            self.sink_value_sum + other.sink_value_sum,
            self.sink_mass + other.sink_mass,
            self.queries + other.queries,
        )

    def sink_value(self, sink_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(float64 [H, D], bool [H]): the mass-weighted mean value of the coded sinks (positions >=
        ``sink_tokens``; the exact ones are left out) and whether the head has any."""
        self._check_sinks(sink_tokens)
        mass = self.sink_mass[:, sink_tokens:].sum(1)
        total = self.sink_value_sum[:, sink_tokens:].sum(1)
        found = mass > 0
        return torch.where(found[:, None], total / mass.clamp(min=1e-30)[:, None], 0.0), found

    def _check_sinks(self, sink_tokens: int) -> None:
        if not 0 <= sink_tokens <= self.LEADING:
            raise ValueError(f"sink_tokens must be between 0 and {self.LEADING}, got {sink_tokens}")

    def coded_concentration(self, sink_tokens: int) -> torch.Tensor:
        """float64 [H]: ``sum_t p_t^2`` over the coded keys (positions >= ``sink_tokens``, which are exact)."""
        self._check_sinks(sink_tokens)
        return (self.concentration - self.leading[:, :sink_tokens].sum(1)).clamp(min=0)

    def error_scale(self, sink_tokens: int) -> torch.Tensor:
        """float64 [H]: relative output error per unit of the cost model's error (coded concentration / energy)."""
        return self.coded_concentration(sink_tokens) / self.energy.clamp(min=1e-30)


@dataclass
class LayerStats:
    """First-pass statistics of one attention layer."""

    key: MomentStats
    value: MomentStats
    query: MomentStats  # queries regrouped per KV head: [N, H, g*D] would be wasteful, see update()
    num_queries_per_kv: int
    attention: AttentionProfile

    @classmethod
    def zeros(cls, num_kv_heads: int, head_dim: int, num_queries_per_kv: int) -> LayerStats:
        z = MomentStats.zeros
        return cls(
            z(num_kv_heads, head_dim),
            z(num_kv_heads, head_dim),
            z(num_kv_heads, head_dim),
            num_queries_per_kv,
            AttentionProfile.zeros(num_kv_heads, head_dim),
        )

    def update(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """q [N, Hq, D], k, v [N, H, D]: the queries' second moments are summed over each KV head's group."""
        n, hq, d = q.shape
        h = k.shape[1]
        self.key.update(k)
        self.value.update(v)
        qg = q.detach().to(device="cpu", dtype=torch.float64).reshape(n, h, hq // h, d)
        self.query.count += n
        self.query.total += qg.sum((0, 2))
        self.query.outer += torch.einsum("nhgd,nhge->hde", qg, qg)

    def merge(self, other: LayerStats) -> LayerStats:
        return LayerStats(
            self.key.merge(other.key),
            self.value.merge(other.value),
            self.query.merge(other.query),
            self.num_queries_per_kv,
            self.attention.merge(other.attention),
        )


@dataclass
class LayerHistograms:
    """Second-pass statistics: counts of normalised rotated coordinates per (head, group)."""

    key: torch.Tensor  # float64 [H, G, NBINS]
    value: torch.Tensor  # float64 [H, G, NBINS]

    @classmethod
    def zeros(cls, num_kv_heads: int, head_dim: int) -> LayerHistograms:
        g = head_dim // GROUP_SIZE
        return cls(torch.zeros(num_kv_heads, g, NBINS, dtype=torch.float64), torch.zeros(num_kv_heads, g, NBINS, dtype=torch.float64))

    def merge(self, other: LayerHistograms) -> LayerHistograms:
        return LayerHistograms(self.key + other.key, self.value + other.value)


def add_to_histogram(hist: torch.Tensor, u: torch.Tensor) -> None:
    """Count normalised coordinates u [N, H, D] into hist [H, G, NBINS] (in place)."""
    n, h, d = u.shape
    g = d // GROUP_SIZE
    width = 2 * HIST_RANGE / NBINS
    b = ((u.detach().to(device="cpu", dtype=torch.float64) + HIST_RANGE) / width).floor().clamp(0, NBINS - 1).long()
    # One flat bincount over (head, group, bin) keeps this vectorised.
    hg = (torch.arange(h).view(1, h, 1) * g + torch.arange(d).view(1, 1, d) // GROUP_SIZE).expand(n, h, d)
    flat = (hg * NBINS + b).reshape(-1)
    hist += torch.bincount(flat, minlength=h * g * NBINS).reshape(h, g, NBINS).to(torch.float64)
