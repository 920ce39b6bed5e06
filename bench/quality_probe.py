#!/usr/bin/env python3
"""Where a preset loses perplexity: the eval's windows through transformers with a simulated packed cache.

Runs the model with transformers (no vLLM) on the same held-out windows as ``spectralquant eval`` and
replaces attention by what serving computes with chunked prefill: a query in chunk ``c`` attends
over its own chunk's raw K/V and over the earlier chunks' K/V decoded from packed slots (the first
``sink_tokens`` positions exact). Only tokens predicted from the second chunk on are scored, as in
the eval, so the per-window perplexity is directly comparable (up to vLLM's numerics).

Per window it reports the NLL change; with ``--per-layer`` it also reports the attention-output
error per layer (simulated vs exact K/V, same queries) and the NLL change when only one group of
layers is compressed; with ``--keep-outliers N`` it keeps the N most outlying tokens of every
16-token block exact (ranked by the key's largest |coordinate| in the calibrated frame), to price
that format idea before building it; ``--key-gain G`` decodes packed keys as mean + G x (decoded - mean)
with the codes unchanged, pricing a decode-only key gain the same way.

With ``--needles`` it scores needle-in-a-haystack trials instead of perplexity windows: the same
trials ``spectralquant eval`` builds from ``--needle-lengths``/``--needle-depths`` (pick some with
``--needle-trials``). Per trial it reports, teacher-forced on the answer, the answer's NLL, whether
every answer token is the top-1 (what greedy decoding needs) and the worst token's logit margin, for
the exact cache, the compressed one, keys exact, values exact and (``--per-layer``) one layer group
compressed at a time: which part of the cache loses a needle.

    python bench/quality_probe.py --model DIR --preset sq3bit [--windows 3] [--per-layer]
    python bench/quality_probe.py --model DIR --preset sq2_5bit --needles --needle-lengths 1024 4096 8176 \
        --needle-depths 0.1 0.25 0.5 0.75 0.9 --needle-trials 5 12 [--per-layer]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch

from vllm_spectralquant.artifact.schema import PRESET_VALUE_MEAN
from vllm_spectralquant.artifact.store import default_artifact_dir, load_artifact
from vllm_spectralquant.calibrate.served_prefill import chunked_prefill_attention
from vllm_spectralquant.corpus import held_out, read_corpus, split_halves
from vllm_spectralquant.files import write_atomic
from vllm_spectralquant.format.codec import decode_slots, encode_slots
from vllm_spectralquant.format.paged import SINK_DTYPE
from vllm_spectralquant.models.capture import load_model
from vllm_spectralquant.models.shape import ModelShape

PROBE_ATTN = "spectralquant_probe"


class SimulatedCache:
    """Per-layer K/V roundtrip and chunked-prefill attention; ``layers`` limits which layers are compressed."""

    def __init__(self, codecs, chunk: int, sink_tokens: int, keep_outliers: int = 0, block: int = 16,
                 outlier_rank: str = "key_max", keys_only: bool = False):
        self.codecs, self.chunk, self.sinks = codecs, chunk, sink_tokens
        self.keep_outliers, self.block, self.outlier_rank = keep_outliers, block, outlier_rank
        self.keys_only = keys_only
        self.exact_component: str | None = None  # "key" / "value": that component is not compressed at all
        self.layers: set[int] | None = None  # None: every layer
        self.errors: dict[int, list[float]] = {}  # layer -> [err2, ref2] of the attention output
        self.key_err: dict[int, torch.Tensor] = {}  # layer -> [T, H] relative key error per token
        self.mass: dict[int, torch.Tensor] = {}  # layer -> [T] attention mass each key receives (exact)
        self.collect = False
        self.emulated: str | None = None  # a vLLM format (backend/emulated_formats.py) instead of our codecs
        #: Decode-only gain on packed keys around their mean, k = mean + gain (k_decoded - mean): the
        #: scores over packed keys sharpened by ``gain`` with the codes unchanged (``--key-gain``).
        self.key_gain = 1.0
        #: Multiple of the log-normal logit correction added to packed keys' scores (``--logit-bias``):
        #: E[exp(q.k) | code] = exp(q.k_hat + q^T Sigma_e q / 2) for a Gaussian residual e, so packed
        #: keys are owed ``scale^2 sum_j (q_j sigma_j)^2 eps_j / 2`` against exact ones (0: off).
        self.logit_bias = 0.0
        self.gain_fit = 0.0  # > 0: per-head variance-restoring key gain from the window, raised to this power
        self.fitted_gain: dict[int, list[torch.Tensor]] = {}
        self.key_resid: dict[int, torch.Tensor] = {}  # layer -> [H, D] residual variance of packed keys (sigma units)

    def roundtrip(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [T, H, D] float32 -> decoded [T, H, D] with sinks (and kept outliers) exact in bf16."""
        codec = self.codecs[layer] if self.codecs else None
        if self.emulated is not None:
            from vllm_spectralquant.backend.emulated_formats import roundtrip as emulated_roundtrip

            kh, vh = emulated_roundtrip(self.emulated, k, v)
        else:
            kh, vh = decode_slots(encode_slots(k, v, codec), codec)
            if self.logit_bias:
                rk = torch.einsum("thd,hde->the", (k - kh)[self.sinks:], codec.key.basis) / codec.key.scale
                self.key_resid[layer] = (rk**2).mean(0)  # [H, D]
        exact = torch.zeros(k.shape[0], k.shape[1], dtype=torch.bool)
        exact[: self.sinks] = True
        if self.keep_outliers:
            t, h, _ = k.shape
            if self.outlier_rank == "key_err":
                score = ((kh - k).norm(dim=-1) / k.norm(dim=-1).clamp(min=1e-9))
            elif self.outlier_rank == "key_abs_err":
                score = (kh - k).norm(dim=-1)
            else:
                rn = torch.einsum("thd,hde->the", k - codec.key.mean, codec.key.basis) / codec.key.scale
                score = rn.abs().amax(-1)  # [T, H]
            nb = -(-t // self.block)
            pad = nb * self.block - t
            s = torch.nn.functional.pad(score.T, (0, pad), value=-1.0).reshape(h, nb, self.block)
            top = s.topk(min(self.keep_outliers, self.block), dim=-1).indices  # [H, nb, n]
            pos = (top + torch.arange(nb).view(1, -1, 1) * self.block).reshape(h, -1)
            for head in range(h):
                p = pos[head][pos[head] < t]
                exact[p, head] = True
        if self.exact_component == "key":
            kh = k
        elif self.exact_component == "value":
            vh = v
        if self.key_gain != 1.0 and self.emulated is None:
            # After --exact-component: exact keys with a gain are the control (does sharpening help without
            # key quantisation?).
            kh = codec.key.mean + self.key_gain * (kh - codec.key.mean)
        kb, vb = k.to(SINK_DTYPE).float(), v.to(SINK_DTYPE).float()
        e = exact[..., None]
        if self.collect:
            self.key_err[layer] = ((kh - k).norm(dim=-1) / k.norm(dim=-1).clamp(min=1e-9))
        ev = e if not self.keys_only else exact[..., None] & (torch.arange(k.shape[0]) < self.sinks).view(-1, 1, 1)
        return torch.where(e, kb, kh), torch.where(ev, vb, vh)

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """query [B, Hq, T, D], key/value [B, H, T, D] -> ([B, T, Hq, D], None)."""
        layer = module.layer_idx
        b, hq, t, d = query.shape
        g = hq // key.shape[1]
        scale = scaling if scaling is not None else d**-0.5
        outs = []
        pos = torch.arange(t)
        causal = pos[None, :] <= pos[:, None]
        for i in range(b):
            k, v = key[i].transpose(0, 1).float(), value[i].transpose(0, 1).float()  # [T, H, D]
            q = query[i].float()
            exact_out = _sdpa(q, k, v, causal, scale, g)
            if self.layers is not None and layer not in self.layers:
                outs.append(exact_out)
                continue
            kq, vq = self.roundtrip(layer, k, v)
            if self.gain_fit:
                # Per KV head, the gain that restores the variance of the scores q.(k - mean) over packed
                # keys, measured on this window's queries and keys (sinks left out).
                m = self.codecs[layer].key.mean
                kt, kd = (k - m)[self.sinks:], (kq - m)[self.sinks:]  # [T', H, D]
                qg = q.reshape(k.shape[1], g, t, d).transpose(1, 2).reshape(k.shape[1], g * t, d)  # [H, gT, D]
                st = torch.einsum("hqd,thd->hqt", qg, kt).pow(2).mean((1, 2))
                sd = torch.einsum("hqd,thd->hqt", qg, kd).pow(2).mean((1, 2))
                gain = (st / sd.clamp(min=1e-30)).sqrt() ** self.gain_fit  # [H]
                self.fitted_gain.setdefault(layer, []).append(gain)
                kq = torch.cat([kq[: self.sinks], m + gain[:, None] * (kq[self.sinks:] - m)])
            stored_bias = None
            if self.logit_bias and self.emulated is None:
                kc = self.codecs[layer].key
                hkv = torch.arange(hq) // g
                qr = torch.einsum("htd,hde->hte", q, kc.basis[hkv]) * kc.scale[hkv][:, None, :]  # [Hq, T, D]
                bias = 0.5 * self.logit_bias * scale**2 * (qr**2 * self.key_resid[layer][hkv][:, None, :]).sum(-1)
                stored_bias = bias[:, :, None].repeat(1, 1, t)  # [Hq, T, T]
                # Columns 0..sinks-1 of the stored copy are exact (sink) keys: no bias there.
                stored_bias[:, :, : self.sinks] = 0.0
            out = chunked_prefill_attention(q, kq, vq, k, v, scale, self.chunk, stored_bias)
            if self.collect:
                e = self.errors.setdefault(layer, [0.0, 0.0])
                sel = pos >= self.chunk
                e[0] += float(((out - exact_out)[:, sel] ** 2).sum())
                e[1] += float((exact_out[:, sel] ** 2).sum())
                kr = k.repeat_interleave(g, dim=1).transpose(0, 1)
                p = torch.softmax((q @ kr.transpose(-1, -2)) * scale + torch.where(causal, 0.0, -math.inf), -1)
                self.mass[layer] = p[:, self.chunk:].mean((0, 1))  # mean over heads and scored queries
            outs.append(out)
        return torch.stack(outs).transpose(1, 2).to(query.dtype), None


def _sdpa(q, k, v, mask, scale, g):
    """q [Hq, T, D]; k, v [S, H, D]; mask bool [T, S] -> [Hq, T, D]."""
    kh = k.repeat_interleave(g, dim=1).transpose(0, 1)
    vh = v.repeat_interleave(g, dim=1).transpose(0, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, kh, vh, attn_mask=mask, scale=scale)


def window_nll(model, ids: torch.Tensor, first_scored: int) -> float:
    """Mean NLL (nats) of tokens ids[first_scored:] given the window."""
    with torch.no_grad():
        logits = model(input_ids=ids[None], use_cache=False).logits[0].float()
    lp = torch.log_softmax(logits[first_scored - 1 : -1], -1)
    return float(-lp.gather(1, ids[first_scored:, None]).mean())


def layer_groups(num_layers: int, groups: int) -> list[tuple[int, int]]:
    """``groups`` contiguous layer ranges [a, b) covering 0..num_layers, as even as rounding allows."""
    bounds = [round(num_layers * g / groups) for g in range(groups + 1)]
    return list(zip(bounds, bounds[1:]))


def write_result(path: Path | None, out: dict) -> None:
    """The probe's JSON at ``path`` (atomically; nothing when None)."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {write_atomic(path, json.dumps(out, indent=1).encode())}")


def answer_score(model, prompt_ids: list[int], answer_ids: list[int]) -> dict:
    """Teacher-forced answer after the prompt: NLL (nats, summed over the answer tokens), whether each
    answer token is the argmax (greedy would produce the answer) and the smallest logit margin of the
    answer token over the best other token (negative: greedy goes wrong there)."""
    ids = torch.tensor(prompt_ids + answer_ids)
    with torch.no_grad():
        logits = model(input_ids=ids[None], use_cache=False, logits_to_keep=len(answer_ids) + 1).logits[0].float()
    logits = logits[:-1]  # positions predicting the answer tokens
    target = torch.tensor(answer_ids)
    lp = torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0]
    own = logits.gather(1, target[:, None])[:, 0]
    other = logits.scatter(1, target[:, None], -math.inf).amax(-1)
    margin = own - other
    return {"nll": round(float(-lp.sum()), 4), "top1": bool((margin > 0).all()), "min_margin": round(float(margin.min()), 3)}


def probe_needles(args, model, tok, shape, codecs) -> dict:
    """The ``--needles`` mode: teacher-forced answer scores per trial and cache variant."""
    from transformers import AttentionInterface

    from vllm_spectralquant.evaluation.needle import served_trials

    text = held_out(tok, read_corpus(None))
    trials = served_trials(tok, text, args.needle_lengths, args.needle_depths)
    chosen = args.needle_trials if args.needle_trials else list(range(len(trials)))
    sim = SimulatedCache(codecs, args.chunk, args.sink_tokens)
    sim.key_gain = args.key_gain
    sim.emulated = args.emulated
    AttentionInterface.register(PROBE_ATTN, sim.attention)
    variants: list[tuple[str, str | None, set[int] | None]] = [("compressed", None, None), ("keys exact", "key", None),
                                                                ("values exact", "value", None)]
    if args.per_layer:
        variants += [(f"only layers {a}-{b - 1}", None, set(range(a, b))) for a, b in layer_groups(shape.num_layers, args.layer_groups)]
    rows = []
    for i in chosen:
        t = trials[i]
        prompt = t.prompt_ids
        answer = tok(" " + t.value, add_special_tokens=False)["input_ids"]
        model.set_attn_implementation("sdpa")
        row = {"trial": i, "context_tokens": t.context_tokens, "depth": t.depth, "exact": answer_score(model, prompt, answer)}
        print(f"needle {i} ({t.context_tokens} @ {t.depth}): exact {row['exact']}", flush=True)
        model.set_attn_implementation(PROBE_ATTN)
        for name, exact_component, layers in variants:
            sim.exact_component, sim.layers = exact_component, layers
            row[name] = answer_score(model, prompt, answer)
            print(f"  {name}: {row[name]}", flush=True)
        sim.exact_component, sim.layers = None, None
        rows.append(row)
    return {"needle_lengths": args.needle_lengths, "needle_depths": args.needle_depths, "trials": rows}


def layer_presets(spec: str, num_layers: int) -> list[str]:
    """'0-7:sq4bit,8-29:sq2_5bit' -> one preset name per layer (every layer named exactly once)."""
    out: list[str | None] = [None] * num_layers
    for part in spec.split(","):
        span, name = part.split(":")
        a, _, b = span.partition("-")
        for i in range(int(a), int(b or a) + 1):
            out[i] = name
    if None in out:
        raise SystemExit(f"--layer-presets leaves layer {out.index(None)} without a preset")
    return out  # type: ignore[return-value]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--artifact", type=Path)
    ap.add_argument("--preset", default="sq3bit")
    ap.add_argument("--ppl-windows", type=int, default=6)
    ap.add_argument("--window-tokens", type=int, default=512)
    ap.add_argument("--windows", type=int, nargs="*", help="indices of the windows to run (default: all)")
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--sink-tokens", type=int, default=1)
    ap.add_argument("--keep-outliers", type=int, nargs="*", default=[0],
                    help="variants: exact tokens per 16-token block, besides the sinks")
    ap.add_argument("--outlier-rank", choices=["key_max", "key_err", "key_abs_err"], default="key_max")
    ap.add_argument("--outlier-block", type=int, default=16, help="tokens per block the outliers are chosen in")
    ap.add_argument("--outlier-keys-only", action="store_true", help="kept outliers: exact keys, coded values")
    ap.add_argument("--exact-component", choices=["key", "value"], help="leave keys or values uncompressed")
    ap.add_argument("--emulated", help="a vLLM format instead of a preset (int4_per_token_head, turboquant_*, fp8), "
                    "every layer compressed and no exact sinks, as the served emulation")
    ap.add_argument("--per-layer", action="store_true", help="attention error per layer and NLL per layer group")
    ap.add_argument("--layer-groups", type=int, default=4)
    ap.add_argument("--layer-presets", help="per-layer presets instead of --preset, e.g. 0-7:sq4bit,8-29:sq2_5bit "
                    "(prices a bit budget that moves between layers)")
    ap.add_argument("--shared-value-mean", action="store_true",
                    help="ignore the presets' sink-anchored value means (calibrate/anchor.py): the ablation")
    ap.add_argument("--needles", action="store_true", help="score needle trials (teacher-forced answer) instead of windows")
    ap.add_argument("--needle-lengths", type=int, nargs="+", default=[1024, 4096, 8176])
    ap.add_argument("--needle-depths", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 0.9])
    ap.add_argument("--needle-trials", type=int, nargs="*", help="indices of the trials to run (default: all)")
    ap.add_argument("--key-gain", type=float, default=1.0,
                    help="decode packed keys as mean + GAIN x (decoded - mean), codes unchanged: prices a decode-only "
                         "key gain (sharper attention over packed keys) before building it into the format")
    ap.add_argument("--logit-bias", type=float, default=0.0,
                    help="add this multiple of the log-normal correction scale^2 sum_j (q_j sigma_j)^2 eps_j / 2 to the "
                         "scores of packed keys (eps_j: the keys' residual variance per rotated coordinate, measured on the window)")
    ap.add_argument("--gain-fit", type=float, default=0.0,
                    help="per KV head, decode packed keys with the gain restoring the scores' variance on the window, "
                         "raised to this power (0: off)")
    ap.add_argument("--calibration-half", action="store_true",
                    help="windows from the corpus half calibration reads instead of the held-out half")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    from transformers import AttentionInterface

    t0 = time.time()
    torch.manual_seed(0)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model, tok = load_model(args.model)
    shape = ModelShape.from_config(model.config)
    if args.emulated:
        codecs, args.sink_tokens, args.preset = None, 0, args.emulated
    else:
        per_layer = layer_presets(args.layer_presets, shape.num_layers) if args.layer_presets else [args.preset] * shape.num_layers
        art = load_artifact(args.artifact or default_artifact_dir(args.model), presets=sorted(set(per_layer)))
        if args.shared_value_mean:
            for tensors in art.presets.values():
                tensors.pop(PRESET_VALUE_MEAN, None)
        codecs = [art.layer_codec(per_layer[i], i) for i in range(shape.num_layers)]
        if args.layer_presets:
            mean_bytes = sum(c.slot_bytes for c in codecs) / len(codecs)
            args.preset = f"{args.layer_presets} (mean {mean_bytes:.2f} B/head-token)"
            print(f"per-layer presets: {args.preset}", flush=True)
    if args.needles:
        out = {"model": args.model.name, "preset": args.preset, "date": datetime.date.today().isoformat(), "chunk": args.chunk,
               "sink_tokens": args.sink_tokens, "key_gain": args.key_gain, **probe_needles(args, model, tok, shape, codecs)}
        out["seconds"] = round(time.time() - t0, 1)
        write_result(args.out, out)
        return 0
    text = held_out(tok, read_corpus(None))
    if args.calibration_half:
        # The half calibration reads: a choice made here (a key gain, say) is a calibration-side choice.
        text = dataclasses.replace(text, held=split_halves(text.ids)[0])
    prefix = text.prefix
    windows = [torch.tensor(w) for w in text.windows(args.window_tokens, args.ppl_windows)]
    chosen = args.windows if args.windows else list(range(len(windows)))
    first = len(prefix) + args.chunk + 1

    ref = {}
    model.set_attn_implementation("sdpa")
    for w in chosen:
        ref[w] = window_nll(model, windows[w], first)
    print("reference NLL per window: " + " ".join(f"{w}:{ref[w]:.4f}" for w in chosen), flush=True)

    rows = []
    for keep in args.keep_outliers:
        sim = SimulatedCache(codecs, args.chunk, args.sink_tokens, keep, block=args.outlier_block,
                             outlier_rank=args.outlier_rank, keys_only=args.outlier_keys_only)
        sim.exact_component = args.exact_component
        sim.emulated = args.emulated
        sim.key_gain = args.key_gain
        sim.logit_bias = args.logit_bias
        sim.gain_fit = args.gain_fit
        AttentionInterface.register(PROBE_ATTN, sim.attention)
        model.set_attn_implementation(PROBE_ATTN)
        row = {"keep_outliers": keep, "windows": {}}
        for w in chosen:
            sim.collect = args.per_layer
            nll = window_nll(model, windows[w], first)
            entry = {"ref_nll": ref[w], "nll": nll, "delta_pct": 100 * (math.exp(nll - ref[w]) - 1)}
            if args.per_layer:
                entry["attn_rel_err"] = [math.sqrt(sim.errors[i][0] / max(sim.errors[i][1], 1e-30)) for i in range(shape.num_layers)]
                # The tokens that receive the most attention beyond position 0, and their key error there.
                top = []
                for i in range(shape.num_layers):
                    m = sim.mass[i]
                    idx = m.topk(4).indices.tolist()
                    top.append([(j, round(float(m[j]), 3), round(float(sim.key_err[i][j].max()), 3),
                                 tok.decode([int(windows[w][j])])) for j in idx])
                entry["top_mass_tokens"] = top
                sim.collect = False
                groups = {}
                for a, b in layer_groups(shape.num_layers, args.layer_groups):
                    sim.layers = set(range(a, b))
                    gn = window_nll(model, windows[w], first)
                    groups[f"{a}-{b - 1}"] = 100 * (math.exp(gn - ref[w]) - 1)
                sim.layers = None
                entry["delta_pct_by_layer_group"] = groups
            row["windows"][w] = entry
            print(f"keep {keep}: window {w}: NLL {ref[w]:.4f} -> {nll:.4f} ({entry['delta_pct']:+.2f} % ppl)", flush=True)
            if args.per_layer:
                errs = entry["attn_rel_err"]
                print("  attention rel. err per layer: " + " ".join(f"{e:.3f}" for e in errs))
                print("  ppl change, one layer group compressed: " + ", ".join(f"{k}: {v:+.2f} %" for k, v in entry["delta_pct_by_layer_group"].items()))
                for i in sorted(range(len(errs)), key=lambda i: -errs[i])[:4]:
                    print(f"  layer {i}: err {errs[i]:.3f}; most-attended keys (pos, mass, key rel err, token): {entry['top_mass_tokens'][i]}")
        d = [row["windows"][w]["nll"] - ref[w] for w in chosen]
        row["delta_pct"] = 100 * (math.exp(sum(d) / len(d)) - 1)
        print(f"keep {keep}: mean over windows {row['delta_pct']:+.2f} % ppl", flush=True)
        if sim.fitted_gain:
            gains = {i: torch.stack(v).mean(0).tolist() for i, v in sorted(sim.fitted_gain.items())}
            row["fitted_gain"] = gains
            print("fitted gain per layer (mean over heads): " + " ".join(f"{i}:{sum(v) / len(v):.3f}" for i, v in gains.items()))
        rows.append(row)

    out = {"model": args.model.name, "preset": args.preset, "date": datetime.date.today().isoformat(),
           "window_tokens": args.window_tokens, "chunk": args.chunk, "sink_tokens": args.sink_tokens,
           "outlier_rank": args.outlier_rank, "shared_value_mean": args.shared_value_mean, "key_gain": args.key_gain, "calibration_half": args.calibration_half, "logit_bias": args.logit_bias, "gain_fit": args.gain_fit, "seconds": round(time.time() - t0, 1), "rows": rows}
    write_result(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
