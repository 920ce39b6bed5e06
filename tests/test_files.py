"""files.write_atomic / save_figure (used by the calibration and eval reports) and serving.parse_metric."""

import os
import stat

import pytest

from vllm_spectralquant.files import save_figure, write_atomic


def test_write_atomic_replaces_the_file_readable_by_others(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")
    assert write_atomic(path, b"new") == path
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_write_atomic_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    path.write_text("old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, b"new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_save_figure_writes_a_png(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2), dpi=50)
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "plot.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_eval_and_calibration_reports_share_write_atomic():
    import vllm_spectralquant.calibrate.report as calib_report
    import vllm_spectralquant.evaluation.report as eval_report

    assert eval_report.write_atomic is write_atomic and calib_report.write_atomic is write_atomic


def test_parse_metric_sums_label_sets():
    from vllm_spectralquant.serving import parse_metric

    text = (
        "# HELP vllm:num_preemptions_total Cumulative number of preemption.\n"
        'vllm:num_preemptions_total{engine="0",model_name="model"} 3.0\n'
        'vllm:request_success_total{engine="0",finished_reason="stop",model_name="model"} 5.0\n'
        'vllm:request_success_total{engine="0",finished_reason="abort",model_name="model"} 2.0\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="model"} 0.0\n'
    )
    assert parse_metric(text, "vllm:num_preemptions_total") == 3.0
    assert parse_metric(text, "vllm:request_success_total") == 7.0
    assert parse_metric(text, "vllm:request_success_total", finished_reason="abort") == 2.0
    assert parse_metric(text, "vllm:request_success_total", finished_reason="error") is None
    assert parse_metric(text, "vllm:kv_cache_usage_perc") == 0.0
    assert parse_metric(text, "vllm:prefix_cache_hits_total") is None
