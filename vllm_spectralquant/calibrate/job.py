"""The calibration job: a model folder + a corpus -> a verified artifact (one entry point).

    calibrate(CalibrationConfig(model_dir=...)) -> CalibrationResult

Steps: validate everything cheap first (model, presets, output, corpus size, Ray address), then
collect statistics (in process or on Ray workers), fit, and write the artifact and its report
atomically. Windows of ``window`` tokens are taken from the corpus in order and run at position
offsets spread evenly over ``[0, max_position - window]``, so the keys are seen rotated as at every
part of the context the model will serve (RoPE is relative: the hidden states of a shifted window
are those of the unshifted one, only the rotation of q and k changes).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_spectralquant.artifact.errors import ArtifactError
from vllm_spectralquant.artifact.fingerprint import fingerprint, read_config
from vllm_spectralquant.artifact.manifest import CorpusInfo, PresetEntry, SinkInfo, preset_file
from vllm_spectralquant.artifact.schema import COMPONENTS, PRESET_KEY_GAIN, PRESET_VALUE_MEAN, tensor_name
from vllm_spectralquant.artifact.store import check_destination, default_artifact_dir, write_artifact
from vllm_spectralquant.calibrate.collect import ModelStats
from vllm_spectralquant.calibrate.errors import CalibrationError
from vllm_spectralquant.calibrate.fit import DEFAULT_KEY_WEIGHT
from vllm_spectralquant.calibrate.key_gain import (
    CHUNK_TOKENS,
    GAIN_WINDOW_TOKENS,
    GAIN_WINDOWS,
    KEY_GAIN_AUTO,
    GainChoice,
    choice_passes,
    choose_key_gains,
    spread_order,
    with_key_gain,
)
from vllm_spectralquant.calibrate.served_prefill import first_scored, reads_packed_keys
from vllm_spectralquant.calibrate.pipeline import ModelFit, collect_in_process, fit_model
from vllm_spectralquant.calibrate.sinks import choose_sink_tokens, sink_positions
from vllm_spectralquant.corpus import corpus_sha256, leading_special_token, read_corpus, tokenize_corpus
from vllm_spectralquant.extras import require as require_extras
from vllm_spectralquant.format.params import GAIN_RANGE, LayerCodec
from vllm_spectralquant.format.presets import PRESETS, Preset
from vllm_spectralquant.models.errors import ModelError
from vllm_spectralquant.models.shape import ModelShape

logger = logging.getLogger(__name__)

#: Raw K/V of about this many tokens are kept to fit the codebooks.
SAMPLE_TOKENS = 4096


@dataclass
class CalibrationConfig:
    model_dir: Path
    out_dir: Path | None = None  # default: MODEL_DIR/spectralquant
    corpus: Path | None = None  # default: lee_background
    tokens: int = 32768
    window: int = 512
    max_position: int | None = None  # default: the model's max context
    presets: Sequence[str] | None = None  # default: every SpectralQuant preset
    num_workers: int = 1
    ray_address: str | None = None
    overwrite: bool = False
    device: str = "auto"
    batch_size: int = 4
    skip_first: int = 1
    key_weight: float = DEFAULT_KEY_WEIGHT  # keys' bit-allocation weight relative to the cost model
    #: Packed keys' decode gain for every preset: a number (1: none), "auto" (each preset's gain chosen by
    #: the served loss of calibration text, calibrate/key_gain.py) or None, the default: "auto" where the
    #: choice's windows are long enough to read packed keys (above CHUNK_TOKENS + 1 tokens), else 1.
    key_gain: float | str | None = None
    key_gain_windows: int = GAIN_WINDOWS  # windows the key-gain choice scores
    #: Tokens in each of them: the calibration text cut again into windows this long (fewer where that
    #: leaves under two), each at positions 0..T-1 like a served request (calibrate/key_gain.py).
    key_gain_tokens: int = GAIN_WINDOW_TOKENS
    #: Spread a preset's bytes over the layers by measured attention error (the preset's size is the
    #: mean): True for every fitted preset, or the names of some. Off by default (BENCHMARKS.md: with
    #: sink-anchored values it no longer helps SmolLM2, and costs it perplexity at 2.5-3 bits).
    layer_budgets: bool | Sequence[str] = False

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        self.out_dir = Path(self.out_dir) if self.out_dir is not None else default_artifact_dir(self.model_dir)
        self.corpus = Path(self.corpus) if self.corpus is not None else None


@dataclass
class CalibrationResult:
    artifact: Path
    fit: ModelFit
    tokens: int
    seconds: dict[str, float] = field(default_factory=dict)


def resolve_presets(names: Sequence[str] | None) -> list[Preset]:
    if not names:
        return [p for p in PRESETS.values() if p.method == "spectralquant"]
    out = []
    for n in names:
        p = PRESETS.get(n.removeprefix("spectralquant_"))
        if p is None or p.method != "spectralquant":
            known = ", ".join(q.name for q in PRESETS.values() if q.method == "spectralquant")
            hint = " (TurboQuant-layout presets need no calibration)" if p is not None else ""
            raise CalibrationError(f"cannot calibrate preset {n!r}{hint}; SpectralQuant presets: {known}")
        out.append(p)
    return out


def layer_budget_presets(choice: bool | Sequence[str], presets: Sequence[Preset]) -> set[str]:
    """The fitted presets whose bytes follow the layers' error: ``choice`` True = all of them, a
    sequence = the ones it names (each must be fitted), False = none."""
    if isinstance(choice, bool):
        return {p.name for p in presets} if choice else set()
    fitted = {p.name for p in presets}
    named = {n.removeprefix("spectralquant_") for n in choice}
    missing = sorted(named - fitted)
    if missing:
        raise CalibrationError(
            f"--layer-budgets {' '.join(missing)}: not among the presets being fitted ({', '.join(sorted(fitted))})"
        )
    return named


def window_offsets(num_windows: int, window: int, max_position: int) -> list[int]:
    """Start position of each window, spread evenly over [0, max_position - window]."""
    span = max_position - window
    if num_windows == 1 or span <= 0:
        return [0] * num_windows
    return [round(i * span / (num_windows - 1)) for i in range(num_windows)]


def gain_window_tokens(cfg: CalibrationConfig, max_context: int | None = None) -> int:
    """Tokens in each window of the key-gain choice: ``cfg.key_gain_tokens``, or half the calibration's
    tokens where those hold fewer than two such windows (a paired standard error needs two), or the
    model's context where that is shorter."""
    tokens = min(cfg.key_gain_tokens, math.ceil(cfg.tokens / cfg.window) * cfg.window // 2)
    return tokens if max_context is None else min(tokens, max_context)


def gain_windows(windows: torch.Tensor, count: int, tokens: int, first_token: int | None = None) -> torch.Tensor:
    """The key-gain choice's windows [N, tokens]: the calibration text (windows [M, W] of consecutive
    corpus tokens) cut again into windows of ``tokens``, each to run at positions 0..tokens-1 like a
    served request, ``count`` of them evenly spaced over the corpus, in an order whose every prefix is
    spread too (the choice may stop early). ``first_token``: the token that starts every calibration window
    in place of a corpus one (Gemma's BOS); it is left out of the running text and starts each of these."""
    text = (windows[:, 1:] if first_token is not None else windows).reshape(-1)
    n = text.numel() // tokens
    cut = text[: n * tokens].view(n, tokens).clone()
    if first_token is not None:
        cut[:, 0] = first_token
    return cut[spread_pick(n, count)]


def spread_pick(n: int, count: int) -> list[int]:
    """``count`` of 0..n-1, evenly spaced, in an order whose every prefix is spread too (``spread_order``)."""
    even = torch.linspace(0, n - 1, min(count, n)).round().long().unique().tolist()
    return [even[i] for i in spread_order(len(even))]


def chooses_key_gain(cfg: CalibrationConfig, max_context: int | None = None) -> bool:
    """Whether calibration chooses the key gains: asked for, or by default where its windows reach past
    one prefill chunk (shorter ones never read a packed key the way serving does)."""
    return cfg.key_gain == KEY_GAIN_AUTO or (
        cfg.key_gain is None and reads_packed_keys(gain_window_tokens(cfg, max_context))
    )


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_context(shape: ModelShape) -> int:
    """The model's context length (tokens), which calibration windows are spread over by default."""
    if shape.max_context is None:
        raise CalibrationError("the model config has no max_position_embeddings; pass --max-position")
    return shape.max_context


def check_options(cfg: CalibrationConfig, max_context: int) -> None:
    """The options' own checks, before anything is loaded (CalibrationError names the option)."""
    if not cfg.key_weight > 0:
        raise CalibrationError(f"--key-weight must be positive, got {cfg.key_weight}")
    if cfg.key_gain == KEY_GAIN_AUTO:
        if cfg.key_gain_windows < 2:
            raise CalibrationError(f"--key-gain-windows must be at least 2 (a paired standard error), got {cfg.key_gain_windows}")
        if cfg.key_gain_tokens < 2:
            raise CalibrationError(f"--key-gain-tokens must be at least 2, got {cfg.key_gain_tokens}")
        if not reads_packed_keys(gain_window_tokens(cfg, max_context)):
            raise CalibrationError(
                f"--key-gain auto scores windows of up to --key-gain-tokens ({cfg.key_gain_tokens}) calibration tokens "
                f"as served with {CHUNK_TOKENS}-token prefill chunks, at least two of them above {first_scored()} "
                f"tokens: it needs --key-gain-tokens and half of --tokens above {first_scored()} "
                f"(got {cfg.key_gain_tokens} and {cfg.tokens})"
            )
    elif cfg.key_gain is not None and not (
        isinstance(cfg.key_gain, (int, float)) and GAIN_RANGE[0] <= cfg.key_gain <= GAIN_RANGE[1]
    ):
        raise CalibrationError(
            f"--key-gain must be {KEY_GAIN_AUTO!r} or a number in [{GAIN_RANGE[0]}, {GAIN_RANGE[1]}], got {cfg.key_gain!r}"
        )
    if cfg.window < 2 or cfg.tokens < cfg.window:
        raise CalibrationError(f"--tokens ({cfg.tokens}) must be at least the window ({cfg.window}) and the window at least 2")
    if cfg.num_workers < 1:
        raise CalibrationError(f"--num-workers must be at least 1, got {cfg.num_workers}")
    if cfg.batch_size < 1:
        raise CalibrationError(f"batch_size must be at least 1, got {cfg.batch_size}")
    if not 0 <= cfg.skip_first < cfg.window:
        raise CalibrationError(f"skip_first ({cfg.skip_first}) must be between 0 and the window ({cfg.window})")
    max_position = cfg.max_position or max_context
    if max_position < cfg.window:
        raise CalibrationError(f"--max-position ({max_position}) is smaller than the window ({cfg.window})")
    if max_position > max_context:
        raise CalibrationError(f"--max-position ({max_position}) exceeds the model's context ({max_context})")


def prepare_windows(
    cfg: CalibrationConfig, tokenizer, max_context: int, text: str | None = None
) -> tuple[torch.Tensor, list[int], CorpusInfo]:
    """Token windows [N, window] from the corpus (``text``: already read), their position offsets, and the corpus record."""
    check_options(cfg, max_context)
    text = read_corpus(cfg.corpus) if text is None else text
    ids = tokenize_corpus(tokenizer, text)
    num = math.ceil(cfg.tokens / cfg.window)
    need = num * cfg.window
    if ids.numel() < need:
        raise CalibrationError(
            f"the corpus has {ids.numel()} tokens, {need} are needed for --tokens {cfg.tokens} "
            f"({num} windows of {cfg.window}); use a larger corpus or fewer --tokens"
        )
    max_position = cfg.max_position or max_context
    windows = ids[:need].view(num, cfg.window).clone()
    first = leading_special_token(tokenizer)
    if first is not None:
        # Served sequences start with it (Gemma's BOS); it takes the place of a corpus token that
        # skip_first would leave out of the statistics anyway.
        windows[:, 0] = first
    info = CorpusInfo(
        source=str(cfg.corpus) if cfg.corpus else "lee_background (gensim test data)",
        sha256=corpus_sha256(text),
        tokens=need,
        window=cfg.window,
        max_position=max_position,
        skip_first_tokens=cfg.skip_first,
        key_weight=cfg.key_weight,
        first_token_id=first,
    )
    return windows, window_offsets(num, cfg.window, max_position), info


def calibrate(
    cfg: CalibrationConfig,
    progress: Callable[[int, int], None] | None = None,
    gain_progress: Callable[[int, int], None] | None = None,
) -> CalibrationResult:
    """Run the whole job; ``progress(done_tokens, total_tokens)`` is called as collection batches
    finish, ``gain_progress(done_passes, total_passes)`` as the key-gain choice's forward passes do
    (their total is an upper bound that passes saved by dropped candidates count towards)."""
    from vllm_spectralquant.models.capture import check_supported_architecture, load_model

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    # Everything cheap first: options, the model's config and shape, the output folder, the extras,
    # the corpus and the Ray address; the model loads only when all of them are fine.
    presets = resolve_presets(cfg.presets)
    config = read_config(cfg.model_dir) if cfg.model_dir.is_dir() else None
    if config is None:
        raise CalibrationError(f"model folder {cfg.model_dir} does not exist")
    model_fp = fingerprint(config)
    shape = ModelShape.from_config(config)
    refusal = shape.serving_refusal()  # what the vLLM backend would refuse the model with
    if refusal:
        raise ModelError(refusal)
    context = model_context(shape)
    check_options(cfg, context)
    layered = layer_budget_presets(cfg.layer_budgets, presets)
    if layered and shape.sliding_window is not None:
        # vLLM groups sliding and full layers separately and sizes the groups' pages alike; layers with
        # their own page sizes across those groups are not built (nor tested) yet.
        raise CalibrationError(
            f"--layer-budgets does not support models with sliding-window layers yet ({cfg.model_dir.name}: "
            f"window {shape.sliding_window}); calibrate without it"
        )
    check_destination(cfg.out_dir, cfg.overwrite)
    distributed = cfg.num_workers > 1 or cfg.ray_address is not None
    needs = {"matplotlib": "the calibration report's plots"}
    if distributed:
        needs["ray"] = "--num-workers / --ray-address"
    require_extras(needs)
    text = read_corpus(cfg.corpus)
    if distributed:
        from vllm_spectralquant.calibrate.distributed import check_ray_address

        check_ray_address(cfg.ray_address)

    device = _pick_device(cfg.device)
    model, tokenizer = load_model(cfg.model_dir, dtype=torch.float32, device=device)
    check_supported_architecture(model.config)
    windows, offsets, corpus = prepare_windows(cfg, tokenizer, context, text)
    sample_stride = max(1, corpus.tokens // SAMPLE_TOKENS)
    seconds["load"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    total = windows.shape[0] * (windows.shape[1] - cfg.skip_first)  # tokens used (sinks excluded)
    auto_gain = chooses_key_gain(cfg, context)
    if cfg.key_gain is None and not auto_gain:
        logger.warning("key gains not chosen: windows of %d tokens never read packed keys as served (%d-token "
                       "prefill chunks); every preset keeps gain 1", gain_window_tokens(cfg, context), CHUNK_TOKENS)
    if auto_gain:
        gain_w = gain_windows(windows, cfg.key_gain_windows, gain_window_tokens(cfg, context), corpus.first_token_id)
        passes = choice_passes(gain_w.shape[0], sum(1 for p in presets if p.method == "spectralquant"))
    on_tokens = _running_total(progress, total)

    if distributed:
        from vllm_spectralquant.calibrate.distributed import collect_with_ray

        del model  # the workers load their own copies
        stats: ModelStats = collect_with_ray(
            cfg.model_dir,
            windows,
            offsets,
            num_workers=cfg.num_workers,
            address=cfg.ray_address,
            batch_size=cfg.batch_size,
            sample_stride=sample_stride,
            skip_first=cfg.skip_first,
            profile_attention=True,
            device=cfg.device,
            progress=on_tokens,
        )
    else:
        stats = collect_in_process(
            model, windows, offsets, batch_size=cfg.batch_size, sample_stride=sample_stride, skip_first=cfg.skip_first,
            profile_attention=True, progress=on_tokens,
        )  # fmt: skip
    seconds["collect"] = time.perf_counter() - t1
    seconds["forward"] = stats.forward_seconds  # summed over workers
    seconds["statistics"] = stats.stats_seconds

    t2 = time.perf_counter()
    sinks = measure_sinks(stats)
    fit = fit_model(
        stats, shape, presets, key_weight_scale=cfg.key_weight, key_gain=1.0 if auto_gain or cfg.key_gain is None else cfg.key_gain,
        layer_budget_presets=layered, sink_tokens=sinks.tokens,
    )  # fmt: skip
    seconds["fit"] = time.perf_counter() - t2
    gain_choices: dict[str, GainChoice] = {}
    if auto_gain:
        t_gain = time.perf_counter()
        if distributed:
            model, _ = load_model(cfg.model_dir, dtype=torch.float32, device=device)  # the workers had their own
        gain_choices = choose_key_gains(model, gain_w, [0] * gain_w.shape[0], fit.codecs, sink_tokens=sinks.tokens,
                                        progress=_running_total(gain_progress, passes))
        fit = dataclasses.replace(fit, codecs={n: with_key_gain(c, gain_choices[n].gain) for n, c in fit.codecs.items()})
        for name, choice in gain_choices.items():
            logger.info("%s key gain: %s", name, choice.describe())
        seconds["key_gain"] = time.perf_counter() - t_gain

    t3 = time.perf_counter()
    bases_tensors, preset_tensors = artifact_tensors(fit, gain_choices)
    report_data = build_report_data(cfg, fit, corpus, seconds, sinks, gain_choices)

    def write_extras(stage: Path):
        from vllm_spectralquant.calibrate.report import write_report

        seconds_final = dict(seconds, write=time.perf_counter() - t3, total=time.perf_counter() - t0)
        return write_report(stage, report_data(seconds_final))

    path = write_artifact(
        cfg.out_dir,
        model=model_fp,
        corpus=corpus,
        bases=bases_tensors,
        presets=preset_tensors,
        write_extras=write_extras,
        overwrite=cfg.overwrite,
        sinks=sinks,
    )
    seconds["write"] = time.perf_counter() - t3
    seconds["total"] = time.perf_counter() - t0
    return CalibrationResult(path, fit, stats.tokens, seconds)


def _running_total(report: Callable[[int, int], None] | None, total: int) -> Callable[[int], None]:
    """A callback taking increments that calls ``report(done so far, total)`` (nothing when None)."""
    done = 0

    def add(n: int) -> None:
        nonlocal done
        done += n
        if report is not None:
            report(done, total)

    return add


def measure_sinks(stats: ModelStats) -> SinkInfo:
    """The sink policy the calibration windows call for (calibrate/sinks.py)."""
    is_sink = sink_positions(stats.key_outliers)
    share = is_sink.float().mean(0)
    return SinkInfo(tokens=choose_sink_tokens(is_sink), share_by_position=[round(float(x), 4) for x in share])


def expected_rel_mse(fit: ModelFit, preset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected relative MSE of keys and values [L, H] under the allocation (from the codebook MSE tables)."""
    out = []
    for comp in ("key", "value"):
        per_layer = []
        for basis, table, codec in zip(fit.bases, fit.codebooks, fit.codecs[preset]):
            b = getattr(basis, comp)
            c = getattr(codec, comp)
            mse = getattr(table, comp).mse  # [H, G, widths]
            d_group = torch.gather(mse, 2, c.bits.long()[..., None]).squeeze(-1)  # [H, G]
            var = (b.sigma**2).reshape(b.sigma.shape[0], -1, 8)  # [H, G, 8]
            per_layer.append((var * d_group[..., None]).sum((1, 2)) / var.sum((1, 2)))
        out.append(torch.stack(per_layer))
    return out[0], out[1]


def layer_slot_bytes(codecs: list[LayerCodec]) -> list[int] | None:
    """Each layer's slot bytes when the fit gave the layers their own sizes, else None."""
    return None if all(c.layer_slot_bytes is None for c in codecs) else [c.slot_bytes for c in codecs]


def preset_key_gain(codecs: list[LayerCodec]) -> float:
    """The keys' decode gain of a fitted preset, as the manifest records it (its mean over layers and heads; 1: none)."""
    gains = [c.key.gain for c in codecs if c.key.gain is not None]
    return round(float(torch.stack(gains).double().mean()), 6) if gains else 1.0


def artifact_tensors(
    fit: ModelFit, gain_choices: Mapping[str, GainChoice] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[PresetEntry, dict[str, torch.Tensor]]]]:
    """The fit as stacked [L, H, ...] tensors for the artifact files (``gain_choices``: how each preset's
    key gain was chosen, recorded in its manifest entry)."""
    bases: dict[str, torch.Tensor] = {}
    for comp in COMPONENTS:
        layers = [getattr(b, comp) for b in fit.bases]
        bases[tensor_name(comp, "mean")] = torch.stack([c.mean for c in layers]).float()
        bases[tensor_name(comp, "basis")] = torch.stack([c.basis for c in layers]).float()
        bases[tensor_name(comp, "scale")] = torch.stack([c.sigma for c in layers]).float()
        bases[tensor_name(comp, "eigvals")] = torch.stack([c.spectrum.eigvals for c in layers]).float()
    presets = {}
    d = fit.shape.head_dim
    for name, codecs in fit.codecs.items():
        p = PRESETS[name]
        tensors = {}
        for comp in COMPONENTS:
            tensors[tensor_name(comp, "bits")] = torch.stack([getattr(c, comp).bits for c in codecs]).to(torch.int32)
            tensors[tensor_name(comp, "codebooks")] = torch.stack([getattr(c, comp).codebooks for c in codecs]).float()
        # The preset's own value mean: sink anchoring (calibrate/anchor.py) puts it on this preset's levels.
        tensors[PRESET_VALUE_MEAN] = torch.stack([c.value.mean for c in codecs]).float()
        if codecs[0].key.gain is not None:
            tensors[PRESET_KEY_GAIN] = torch.stack([c.key.gain for c in codecs]).float()
        k_mse, v_mse = expected_rel_mse(fit, name)
        entry = PresetEntry(
            name=name,
            slot_bytes=p.slot_bytes(d),
            layer_slot_bytes=layer_slot_bytes(codecs),
            compression_vs_bf16=round(4 * d * len(codecs) / sum(c.slot_bytes for c in codecs), 4),
            file=preset_file(name),
            key_rel_mse=float(k_mse.mean()),
            value_rel_mse=float(v_mse.mean()),
            key_gain=preset_key_gain(codecs),
            key_gain_chosen_on=len(gain_choices[name].loss[0]) if gain_choices and name in gain_choices else 0,
        )
        presets[name] = (entry, tensors)
    return bases, presets


def build_report_data(cfg: CalibrationConfig, fit: ModelFit, corpus: CorpusInfo, seconds: dict[str, float],
                      sinks: SinkInfo | None = None, gain_choices: Mapping[str, GainChoice] | None = None):
    """A function seconds -> ReportData (the timings are only final when the report is written)."""
    from vllm_spectralquant.calibrate.report import PresetReport, ReportData

    def energy_share(comp: str) -> torch.Tensor:
        rows = []
        for b in fit.bases:
            c = getattr(b, comp)
            mean2 = (c.mean**2).sum(-1)
            rows.append(mean2 / (mean2 + c.spectrum.eigvals.sum(-1)))
        return torch.stack(rows)

    presets = []
    for name, codecs in fit.codecs.items():
        p = PRESETS[name]
        k_mse, v_mse = expected_rel_mse(fit, name)
        presets.append(
            PresetReport(
                name=name,
                slot_bytes=p.slot_bytes(fit.shape.head_dim),
                compression_vs_bf16=p.compression_vs_bf16(fit.shape.head_dim),
                key_bits=torch.stack([c.key.bits for c in codecs]),
                value_bits=torch.stack([c.value.bits for c in codecs]),
                key_rel_mse=k_mse,
                value_rel_mse=v_mse,
                layer_slot_bytes=layer_slot_bytes(codecs),
                key_gain=preset_key_gain(codecs),
                key_gain_choice=None if not gain_choices or name not in gain_choices else gain_choices[name].describe(),
            )
        )

    def make(seconds_final: dict[str, float]) -> ReportData:
        return ReportData(
            model_name=cfg.model_dir.name,
            num_layers=fit.shape.num_layers,
            num_heads=fit.shape.num_heads,
            num_kv_heads=fit.shape.num_kv_heads,
            head_dim=fit.shape.head_dim,
            tokens=corpus.tokens,
            corpus=corpus.source,
            max_position=corpus.max_position,
            seconds=seconds_final,
            key_eigvals=torch.stack([b.key.spectrum.eigvals for b in fit.bases]),
            value_eigvals=torch.stack([b.value.spectrum.eigvals for b in fit.bases]),
            key_mean_energy=energy_share("key"),
            value_mean_energy=energy_share("value"),
            presets=presets,
            sink_tokens=None if sinks is None else sinks.tokens,
            sink_share=None if sinks is None else sinks.share_by_position,
            anchored_heads=sum(int(b.sink_found.sum()) for b in fit.bases if b.sink_found is not None),
        )

    return make


__all__ = ["ArtifactError", "CalibrationConfig", "CalibrationError", "CalibrationResult", "calibrate"]


def current_artifact(model_dir: Path | str, *, tokens: int = 16384, out_dir: Path | None = None) -> Path | None:
    """The model's artifact if it verifies against the model and was fitted with this package's defaults
    and at least ``tokens`` tokens, else None (with a warning that says why, when one is there)."""
    from vllm_spectralquant.artifact import fingerprint_of, load_artifact

    model_dir = Path(model_dir)
    out = Path(out_dir) if out_dir is not None else default_artifact_dir(model_dir)
    if not out.exists():
        return None
    try:
        art = load_artifact(out, expect=fingerprint_of(model_dir))
    except ArtifactError as e:
        logger.warning("not current: %s", e)
        return None
    corpus = art.manifest.corpus
    # Artifacts written before sink anchoring have no per-preset value mean.
    anchored = all(PRESET_VALUE_MEAN in t for t in art.presets.values())
    gains = all(e.key_gain_chosen_on > 0 for e in art.manifest.presets)  # chosen, as by default
    if corpus.key_weight == DEFAULT_KEY_WEIGHT and gains and corpus.tokens >= tokens and anchored:
        return out
    logger.warning("not current: %s was fitted with other settings", out)
    return None


def ensure_calibrated(model_dir: Path | str, *, tokens: int = 16384, out_dir: Path | None = None) -> Path:
    """The model's artifact: ``current_artifact``'s, else calibrated (replacing any there)."""
    model_dir = Path(model_dir)
    out = Path(out_dir) if out_dir is not None else default_artifact_dir(model_dir)
    found = current_artifact(model_dir, tokens=tokens, out_dir=out)
    if found is not None:
        return found
    if out.exists():
        logger.warning("recalibrating %s", out)
    return calibrate(CalibrationConfig(model_dir=model_dir, out_dir=out, tokens=tokens, overwrite=True)).artifact
