"""`spectralquant eval`: the quality report on the user's own model, through vLLM.

For the uncompressed cache ("bf16" method: vLLM's own cache at the model's serving dtype) and each
preset, one `vllm serve` run measures:

* perplexity via ``prompt_logprobs`` on held-out corpus windows. Prefill is chunked
  (``--max-num-batched-tokens = prefill_chunk``) and only tokens predicted from the second chunk on
  are scored: each of those queries attends over the window's earlier chunks, already packed in the
  cache (the first chunk attends over raw K/V, so scoring it would hide the compression);
* needle-in-a-haystack retrieval at several depths and context lengths up to the model's context;
* agreement of greedy continuations with the uncompressed cache (mean common-prefix fraction);
* vLLM's own KV capacity (tokens) from its startup log.

vLLM's own compressed caches (``turboquant_*``, ``int4_per_token_head``, ``fp8``) and the noise floor
``bf16_rounded`` are emulated by our backend (``vllm_spectralquant/emulation.py``): their bytes per
head-token are what vLLM allocates (read from our backend's log line), and their capacity is analytic
(the reference's bf16 capacity times the byte ratio), not the dense emulation's own vLLM log figure.

Every row's perplexity change carries its spread: the standard error of the per-window paired
difference (mean NLL per token, method minus reference) over the windows, in percent.

Proof that the compressed path ran: each SpectralQuant/TQ/emulated run must log our backend's
line, and produce numbers that differ from the reference.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_spectralquant.artifact import default_artifact_dir, read_manifest
from vllm_spectralquant.errors import SpectralQuantError
from vllm_spectralquant.emulation import EMULATED_METHODS, get_emulated, is_emulated
from vllm_spectralquant.evaluation.metrics import common_prefix, greedy_many, window_nlls
from vllm_spectralquant.evaluation.needle import pass_rate, served_trials
from vllm_spectralquant.format.presets import PRESETS, get_preset
from vllm_spectralquant.models.shape import ModelShape

REFERENCE = "bf16"
#: Our backend's line for an emulated format (backend/emulated_dense.py ``bytes_log_line``).
EMULATED_BYTES_RE = re.compile(r"SpectralQuant emulation: (\S+) ([\d.]+) B per head-token")


class EvalError(SpectralQuantError):
    """The eval cannot give a trustworthy answer (bad options, a resumed report that does not match, a
    compressed run that shows no sign of the compressed path); the message names the cause."""


@dataclass
class EvalConfig:
    model_dir: Path
    artifact: Path | None = None
    presets: Sequence[str] | None = None  # default: every preset (SpectralQuant and TQ layout); emulated names too
    corpus: Path | None = None
    ppl_windows: int = 8
    ppl_window_tokens: int = 1024
    prefill_chunk: int = 128
    needle_lengths: Sequence[int] | None = None  # default: 1k, half and (nearly) all of the context
    needle_depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9)
    greedy_prompts: int = 16
    greedy_tokens: int = 64
    kv_cache_gib: int = 2
    dtype: str = "auto"  # auto: float32 on CPU (bf16 matmuls are slow on most CPUs), bfloat16 on CUDA
    sink_tokens: int | None = None
    extra_server_args: list[str] = field(default_factory=list)
    resume: dict | None = None  # an earlier (partial) report with the same settings: its preset rows are kept


@dataclass
class MethodResult:
    method: str  # bf16 (the reference), spectralquant, turboquant (our TQ layout), vllm / noise_floor (emulated)
    preset: str | None
    kv_cache_dtype: str
    bytes_per_head_token: float  # emulated vLLM formats: averaged over layers (TurboQuant's skipped layers at bf16)
    compression: float  # bf16 bytes / bytes per head-token (slot)
    ppl: float
    ppl_delta_pct: float | None
    needle_pass_rate: float
    greedy_agreement: float | None
    kv_capacity_tokens: int | None
    kv_capacity_vs_bf16: float | None
    needles: list[bool]
    seconds: float
    ppl_delta_se_pct: float | None = None  # standard error of ppl_delta_pct over windows (paired with the reference)
    window_nll: list[float] = field(default_factory=list)  # mean NLL per scored token, per window
    kv_capacity_source: str = "vLLM log"  # or "analytic (bytes)" for emulated formats


def _serving_dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def _model_shape(model_dir: Path) -> tuple[int, int]:
    shape = ModelShape.from_model_dir(model_dir)
    return shape.head_dim, shape.max_context or 2048


def _inputs(cfg: EvalConfig, max_context: int):
    """Held-out token windows, greedy prompts, needle trials and the tokenizer."""
    from transformers import AutoTokenizer

    from vllm_spectralquant.corpus import held_out, read_corpus

    tok = AutoTokenizer.from_pretrained(cfg.model_dir)
    text = held_out(tok, read_corpus(cfg.corpus))
    prefix = text.prefix
    windows = text.windows(cfg.ppl_window_tokens, cfg.ppl_windows)
    # Greedy prompts come from the held-out text after the perplexity windows (or its start if short).
    start = max(0, min(cfg.ppl_windows * cfg.ppl_window_tokens, len(text.held) - 64 * cfg.greedy_prompts))
    prompts = [w[: len(prefix) + 48] for w in text.windows(64, cfg.greedy_prompts, start=start)]
    lengths = cfg.needle_lengths or sorted({1024, max_context // 2, max_context - 256})
    # The answer needs room after the prompt: the last 16 positions of the context stay free.
    too_long = [n for n in lengths if n > max_context - 16]
    if cfg.needle_lengths and too_long:
        raise EvalError(f"--needle-lengths {' '.join(map(str, too_long))}: longer than the model's context "
                        f"({max_context} tokens) minus 16 for the answer; use at most {max_context - 16}")
    trials = served_trials(tok, text, [n for n in lengths if n not in too_long], cfg.needle_depths)
    return windows, prompts, trials


@dataclass(frozen=True)
class _Method:
    """One row to measure: its label, preset name (None: the reference) and kv-cache dtype."""

    method: str
    preset: str | None
    kv_cache_dtype: str
    needs_artifact: bool = False
    emulated: bool = False


def methods_for(names: Sequence[str] | None) -> list[_Method]:
    """The reference, then ``names`` (SpectralQuant/TQ presets or emulated methods) in order."""
    rows = [_Method(REFERENCE, None, "auto")]
    for name in names or list(PRESETS):
        if is_emulated(name):
            m = get_emulated(name)
            rows.append(_Method(m.family, m.name, m.kv_cache_dtype, emulated=True))
        else:
            try:
                p = get_preset(name)
            except SpectralQuantError as e:
                raise EvalError(f"{e}; or an emulated method: {', '.join(EMULATED_METHODS)}") from None
            rows.append(_Method(p.method, p.name, p.kv_cache_dtype, needs_artifact=p.method == "spectralquant"))
    return rows


def paired_delta(window_nll: Sequence[float], ref_window_nll: Sequence[float]) -> tuple[float, float | None]:
    """Perplexity change (%) and its standard error (%) from per-window mean NLLs paired with the reference.

    With equal scored tokens per window the change is ``exp(mean d) - 1`` for ``d_w = nll_w - ref_w``;
    its standard error is ``exp(mean d) * std(d) / sqrt(W)`` (None for fewer than 2 windows).
    """
    d = [a - b for a, b in zip(window_nll, ref_window_nll)]
    mean = sum(d) / len(d)
    if len(d) < 2:
        return 100 * (math.exp(mean) - 1), None
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    return 100 * (math.exp(mean) - 1), 100 * math.exp(mean) * sd / math.sqrt(len(d))


def _checked_artifact(cfg: EvalConfig, methods: list[_Method]) -> dict | None:
    """:func:`artifact_record` of the artifact the SpectralQuant presets need (None: no such preset).
    A missing or unreadable one is an EvalError now, not after the reference has run for minutes and
    the first preset's server has failed with vLLM's generic start-up error."""
    from vllm_spectralquant.artifact import ArtifactError
    from vllm_spectralquant.artifact.manifest import MANIFEST_NAME

    wanted = [m.preset for m in methods if m.needs_artifact]
    if not wanted:
        return None
    where = cfg.artifact or default_artifact_dir(cfg.model_dir)
    if not (Path(where) / MANIFEST_NAME).exists():
        raise EvalError(f"{', '.join(wanted)} need a SpectralQuant artifact and there is none at {where}: run "
                        f"`spectralquant calibrate {cfg.model_dir}` first, or pass --artifact DIR")
    try:
        read_manifest(where)
    except ArtifactError as e:
        raise EvalError(f"{', '.join(wanted)} need a SpectralQuant artifact: {e}") from e
    return artifact_record(where)


def artifact_record(artifact: Path) -> dict | None:
    """What identifies the artifact the SpectralQuant rows are measured with (None: there is none yet):
    its manifest's sha256 and creation time, and the calibration settings that move the numbers. Two
    calibrations of one model with other settings (or another corpus) differ by tenths of a percent of
    perplexity, so a report says which one it measured and ``--resume`` refuses to mix them."""
    from vllm_spectralquant.artifact import ArtifactError
    from vllm_spectralquant.artifact.manifest import MANIFEST_NAME

    try:
        m = read_manifest(artifact)
    except ArtifactError:
        return None
    return {
        "path": str(artifact),
        "manifest_sha256": hashlib.sha256((Path(artifact) / MANIFEST_NAME).read_bytes()).hexdigest(),
        "created": str(m.created),
        "corpus": m.corpus.source,
        "tokens": m.corpus.tokens,
        "window": m.corpus.window,
        "key_weight": m.corpus.key_weight,
        "layer_budgets": [e.name for e in m.presets if e.layer_slot_bytes is not None],
        "key_gains": {e.name: e.key_gain for e in m.presets},
    }


def calibrated_slot_bytes(artifact: Path, preset: str, head_dim: int) -> float:
    """A SpectralQuant preset's bytes per head-token, averaged over the layers the artifact sized."""
    entry = read_manifest(artifact).preset(preset) if get_preset(preset).method == "spectralquant" else None
    if entry is None or entry.layer_slot_bytes is None:
        return float(get_preset(preset).slot_bytes(head_dim))
    return sum(entry.layer_slot_bytes) / len(entry.layer_slot_bytes)


def emulated_bytes(log: str, kv_dtype: str) -> float:
    """Bytes per head-token our backend logged for an emulated format (vLLM's own allocation)."""
    for m in EMULATED_BYTES_RE.finditer(log):
        if m.group(1) == kv_dtype:
            return float(m.group(2))
    raise EvalError(f"{kv_dtype}: the server log shows no SpectralQuant emulation line; the emulated path did not run")


def evaluate(cfg: EvalConfig, log: Callable[[str], None] = print, on_result: Callable[[dict], None] | None = None) -> dict:
    """Run every method side by side; returns the JSON-ready report.

    ``on_result`` gets the report so far (``"complete": False``) after each method, so a caller can
    save partial results of a long run.
    """
    from vllm_spectralquant.serving import ServerOptions, VllmServer

    cfg.model_dir = Path(cfg.model_dir)
    if not 0 < cfg.prefill_chunk < cfg.ppl_window_tokens - 1:
        raise EvalError(f"--prefill-chunk {cfg.prefill_chunk} must be smaller than the perplexity window ({cfg.ppl_window_tokens} tokens)")
    head_dim, max_context = _model_shape(cfg.model_dir)
    methods = methods_for(cfg.presets)
    artifact = _checked_artifact(cfg, methods)
    dtype = _serving_dtype(cfg.dtype)
    windows, prompts, trials = _inputs(cfg, max_context)
    max_len = max([cfg.ppl_window_tokens + 8] + [len(t.prompt_ids) + 16 for t in trials])
    log(f"eval {cfg.model_dir.name}: {len(windows)} x {cfg.ppl_window_tokens} tokens for perplexity (prefill chunk "
        f"{cfg.prefill_chunk}), {len(trials)} needles, {len(prompts)} greedy prompts; dtype {dtype}")

    kept, resumed_ref = _resumable(cfg, _report(cfg, dtype, windows, prompts, trials, [], complete=False), artifact, log)
    results: list[MethodResult] = []
    ref: MethodResult | None = None
    ref_greedy = None
    full_bytes = 4 * head_dim  # bf16 K and V: the byte convention of the reference
    for m in methods:
        kv_dtype = m.kv_cache_dtype
        if kv_dtype in kept:
            log(f"  {kv_dtype}: kept from the resumed report (ppl {kept[kv_dtype].ppl:.3f})")
            results.append(kept[kv_dtype])
            continue
        opts = ServerOptions(
            cfg.model_dir,
            kv_dtype,
            artifact=cfg.artifact if m.needs_artifact else None,
            dtype=dtype,
            max_model_len=max_len,
            max_num_batched_tokens=cfg.prefill_chunk,
            max_num_seqs=min(cfg.prefill_chunk, 64),
            kv_cache_gib=cfg.kv_cache_gib,
            enable_prefix_caching=False,  # every score must come from this request's own cache
            sink_tokens=None if m.emulated else cfg.sink_tokens,
            extra_args=list(cfg.extra_server_args),
        )
        t0 = time.monotonic()
        log(f"  {kv_dtype}: starting vllm serve")
        with VllmServer(opts) as server:
            client = server.client(timeout=3600)
            parts = window_nlls(client, windows, concurrency=4, first_scored=cfg.prefill_chunk + 1)
            greedy = greedy_many(client, prompts, cfg.greedy_tokens, concurrency=8)
            needle_rate, needles = pass_rate(client, trials)
            capacity = server.kv_capacity_tokens()
            server_log = server.log()
            if m.preset is not None and "SpectralQuant" not in server_log:
                raise EvalError(f"{kv_dtype}: the server log shows no SpectralQuant backend; the compressed path did not run")
        if m.preset is None:
            bytes_per: float = full_bytes
        elif m.emulated:
            bytes_per = emulated_bytes(server_log, kv_dtype)
        else:
            bytes_per = calibrated_slot_bytes(cfg.artifact or default_artifact_dir(cfg.model_dir), m.preset, head_dim)
        ppl = math.exp(sum(p[0] for p in parts) / sum(p[1] for p in parts))
        res = MethodResult(
            method=m.method,
            preset=m.preset,
            kv_cache_dtype=kv_dtype,
            bytes_per_head_token=round(bytes_per, 3),
            compression=round(full_bytes / bytes_per, 3),
            ppl=round(ppl, 4),
            ppl_delta_pct=None,
            needle_pass_rate=round(needle_rate, 4),
            greedy_agreement=None,
            kv_capacity_tokens=capacity,
            kv_capacity_vs_bf16=None,
            needles=needles,
            seconds=round(time.monotonic() - t0, 1),
            window_nll=[round(nll / n, 7) for nll, n in parts],
        )
        if ref is None:
            if resumed_ref is not None and res.ppl != resumed_ref.ppl:
                raise EvalError(f"--resume: the reference perplexity is {res.ppl} now but {resumed_ref.ppl} in the resumed "
                                   "report; something changed (model, vLLM, corpus), so its rows are not comparable: start afresh")
            ref, ref_greedy = res, greedy
            # The reference cache holds the model dtype: in float32 a bf16 cache would hold twice the tokens.
            ref_bf16_capacity = capacity * (2 if dtype == "float32" else 1) if capacity else None
            res.greedy_agreement = 1.0
            res.ppl_delta_pct = 0.0
            res.kv_capacity_vs_bf16 = 1.0 if dtype != "float32" else 0.5
        else:
            delta, se = paired_delta(res.window_nll, ref.window_nll)
            res.ppl_delta_pct = round(delta, 3)
            res.ppl_delta_se_pct = None if se is None else round(se, 3)
            res.greedy_agreement = round(sum(common_prefix(a, b) / len(b) for a, b in zip(greedy, ref_greedy)) / len(ref_greedy), 4)
            if m.emulated:
                # The dense emulation's own capacity is not the format's: count the format's bytes instead.
                res.kv_capacity_source = "analytic (bytes)"
                res.kv_capacity_vs_bf16 = round(full_bytes / bytes_per, 3)
                res.kv_capacity_tokens = int(ref_bf16_capacity * full_bytes / bytes_per) if ref_bf16_capacity else None
            elif capacity and ref_bf16_capacity:
                res.kv_capacity_vs_bf16 = round(capacity / ref_bf16_capacity, 3)
            if res.ppl == ref.ppl and res.window_nll == ref.window_nll:
                raise EvalError(f"{kv_dtype}: perplexity equals the reference exactly; the compressed path did not run")
        se_text = f" ± {res.ppl_delta_se_pct:.2f}" if res.ppl_delta_se_pct is not None else ""
        log(f"  {kv_dtype}: ppl {res.ppl:.3f} ({res.ppl_delta_pct:+.2f}{se_text} %), needles {res.needle_pass_rate:.2f}, "
            f"agreement {res.greedy_agreement:.2f}, capacity {res.kv_capacity_tokens} tokens ({res.seconds:.0f}s)")
        results.append(res)
        if on_result is not None:
            on_result(_report(cfg, dtype, windows, prompts, trials, results, complete=False, artifact=artifact))

    return _report(cfg, dtype, windows, prompts, trials, results, complete=True, artifact=artifact)


def _resumable(
    cfg: EvalConfig, fresh: dict, artifact: dict | None = None, log: Callable[[str], None] = print
) -> tuple[dict[str, MethodResult], MethodResult | None]:
    """The preset rows of ``cfg.resume`` (by kv-cache dtype) and its reference row, after checking that
    it was measured with the same settings, and its SpectralQuant rows with the same artifact
    (``artifact``: :func:`artifact_record` of this run's). The reference itself always runs again:
    greedy agreement needs its outputs, and its perplexity must reproduce the resumed one exactly."""
    if cfg.resume is None:
        return {}, None
    for key in ("model", "serving_dtype", "perplexity", "needle", "greedy"):
        if cfg.resume.get(key) != fresh[key]:
            raise EvalError(f"--resume: the report was made with other settings ({key}: {cfg.resume.get(key)!r} "
                             f"vs {fresh[key]!r} now); start afresh or use the same options")
    rows = [MethodResult(**r) for r in cfg.resume.get("results", [])]
    ref = next((r for r in rows if r.preset is None), None)
    calibrated = [r.kv_cache_dtype for r in rows if r.method == "spectralquant"]
    if calibrated and artifact is not None:
        before = cfg.resume.get("artifact")
        if before is None:
            log(f"  --resume: the report does not say which artifact its rows {', '.join(calibrated)} were measured "
                "with (made before reports recorded it); they are kept as they are")
        elif before.get("manifest_sha256") != artifact["manifest_sha256"]:
            raise EvalError(f"--resume: the report's SpectralQuant rows ({', '.join(calibrated)}) were measured with the "
                            f"artifact {before.get('path')} created {before.get('created')}, this run uses {artifact['path']} "
                            f"created {artifact['created']}; start afresh, or remove those rows from the report to re-run them")
    return {r.kv_cache_dtype: r for r in rows if r.preset is not None and ref is not None}, ref


def _report(cfg: EvalConfig, dtype: str, windows, prompts, trials, results: list[MethodResult], complete: bool,
            artifact: dict | None = None) -> dict:
    return {
        "model": cfg.model_dir.name,
        "artifact": artifact,
        "complete": complete,
        "date": datetime.date.today().isoformat(),
        "serving_dtype": dtype,
        "reference": "the uncompressed cache at the serving dtype" + (" (float32; bf16 capacity = 2x)" if dtype == "float32" else ""),
        "perplexity": {"windows": len(windows), "window_tokens": cfg.ppl_window_tokens, "prefill_chunk": cfg.prefill_chunk,
                       "scored_tokens_per_window": cfg.ppl_window_tokens - cfg.prefill_chunk - 1,
                       "scoring": "chunked prefill; only tokens predicted from the second chunk on are scored, "
                                  "so every scored query attends over packed context"},
        "needle": {"trials": [{"context_tokens": t.context_tokens, "depth": t.depth} for t in trials]},
        "greedy": {"prompts": len(prompts), "tokens": cfg.greedy_tokens, "agreement": "mean common-prefix fraction with the reference"},
        "spread": f"Δ ppl ± its standard error over the {len(windows)} windows (per-window mean NLL paired with the reference)",
        "results": [asdict(r) for r in results],
        "noise_floor": noise_floor(results),
        "goal": goal_check(results),
    }


def noise_floor(results: Sequence[MethodResult]) -> dict:
    """What harmless changes score: the noise-floor rows (bf16_rounded) and fp8 against bf16_rounded."""
    by = {r.preset: r for r in results if r.preset is not None}
    floor = {r.preset: {"ppl_delta_pct": r.ppl_delta_pct, "ppl_delta_se_pct": r.ppl_delta_se_pct,
                        "needle_pass_rate": r.needle_pass_rate, "greedy_agreement": r.greedy_agreement}
             for r in results if r.method == "noise_floor"}
    out: dict = {"rows": floor}
    base = by.get("bf16_rounded")
    if base is not None and "fp8" in by and base.window_nll and by["fp8"].window_nll:
        delta, se = paired_delta(by["fp8"].window_nll, base.window_nll)
        out["fp8_vs_bf16_rounded"] = {"ppl_delta_pct": round(delta, 3), "ppl_delta_se_pct": None if se is None else round(se, 3)}
    return out


def goal_check(results: Sequence[MethodResult]) -> list[dict]:
    """Each SpectralQuant preset against each emulated vLLM format with the same or more bytes: lower
    perplexity wins; the margin is also given in standard errors of the paired difference."""
    checks = []
    for sq in (r for r in results if r.method == "spectralquant"):
        for v in (r for r in results if r.method == "vllm" and r.bytes_per_head_token >= sq.bytes_per_head_token):
            delta, se = paired_delta(sq.window_nll, v.window_nll) if sq.window_nll and v.window_nll else (None, None)
            checks.append({"spectralquant": sq.preset, "bytes": sq.bytes_per_head_token, "vllm": v.preset, "vllm_bytes": v.bytes_per_head_token,
                           "ppl": sq.ppl, "vllm_ppl": v.ppl, "lower_ppl": sq.ppl < v.ppl,
                           "ppl_vs_vllm_pct": None if delta is None else round(delta, 3),
                           "ppl_vs_vllm_se_pct": None if se is None else round(se, 3)})
    return checks
