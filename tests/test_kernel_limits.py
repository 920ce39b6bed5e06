"""The kernel limits are defined once (format/kernel_limits.py): the CUDA header is generated from them."""

from __future__ import annotations

from pathlib import Path

from vllm_spectralquant.format import kernel_limits
from vllm_spectralquant.ops import cuda_ext

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def test_checked_in_cuda_header_is_the_generated_one():
    header = (CSRC / "sq_limits.h").read_text()
    assert header == kernel_limits.cuda_header(), (
        "csrc/sq_limits.h is stale: run `python -m vllm_spectralquant.format.kernel_limits --write-header`"
    )


def test_header_is_part_of_the_extension_build_key(tmp_path, monkeypatch):
    assert "sq_limits.h" in cuda_ext._HEADERS
    monkeypatch.setenv("SPECTRALQUANT_HOME", str(tmp_path))
    name, _ = cuda_ext.build_dir("9.0a")
    src = tmp_path / "csrc"
    src.mkdir()
    for f in cuda_ext._SOURCES + cuda_ext._HEADERS:
        (src / f).write_bytes((CSRC / f).read_bytes())
    (src / "sq_limits.h").write_text(kernel_limits.cuda_header().replace("kMaxSplits = 64", "kMaxSplits = 32"))
    monkeypatch.setattr(cuda_ext, "source_dir", lambda: src)
    assert cuda_ext.build_dir("9.0a")[0] != name


def test_no_kernel_source_restates_the_limits():
    """The constants appear in csrc/ only through the generated header."""
    for path in CSRC.iterdir():
        if path.name == "sq_limits.h" or path.suffix not in {".cu", ".cuh", ".h", ".cpp"}:
            continue
        text = path.read_text()
        for name in ("kGroup", "kMaxGroup", "kMaxSinkTokens", "kMaxSplits", "kPairMaxBits", "kStripeGroups"):
            assert f"constexpr int {name} =" not in text, f"{path.name} defines {name}"
