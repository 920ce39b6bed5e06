"""The csrc/ CUDA sources compile on a GPU-less machine: nvcc to sm_90a objects, the binding against torch's headers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
NVCC = shutil.which("nvcc") or (
    str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc") if os.environ.get("CUDA_HOME") else None
)

pytestmark = pytest.mark.skipif(NVCC is None or not Path(NVCC).exists(), reason="nvcc not found (CUDA toolkit absent)")


def _nvcc(source: str, out_dir: Path) -> subprocess.CompletedProcess:
    cmd = [
        NVCC, "-c", "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
        f"-I{CSRC}", "-o", str(out_dir / (Path(source).stem + ".o")), str(CSRC / source),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True)


def test_cuda_kernels_compile_for_sm90a(tmp_path):
    sources = ["sq_store.cu", "sq_gather.cu", "sq_decode.cu"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(sources, pool.map(lambda s: _nvcc(s, tmp_path), sources)))
    for name, proc in results.items():
        assert proc.returncode == 0, f"{name}:\n{proc.stderr[-6000:]}"
        assert (tmp_path / (Path(name).stem + ".o")).stat().st_size > 0
    # The hot decode kernel (head_dim 128, GQA <= 8) must not spill more than a few words to local memory.
    report = results["sq_decode.cu"].stderr
    match = re.search(r"split_kernelILi128ELi1E.*?\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores", report, re.S)
    assert match, report[-3000:]
    assert int(match.group(2)) <= 64, f"split_kernel<128,1> spills {match.group(2)} bytes"


def test_torch_binding_compiles_against_torch_headers(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    include = Path(torch.__file__).parent / "include"
    if not (include / "torch" / "library.h").exists():
        pytest.skip("this torch has no C++ headers")
    candidates = [Path(os.environ.get("CUDA_HOME", "/nonexistent")) / "include", Path(NVCC).resolve().parent.parent / "include"]
    candidates += [Path("/usr/local/cuda/include")]
    cuda_include = next((c for c in candidates if (c / "cuda_runtime.h").exists()), None)
    if cuda_include is None:
        pytest.skip("CUDA headers (cuda_runtime.h) not found")
    # CPU wheels ship c10/cuda headers but not their generated config header; an empty one suffices to parse.
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not (include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [
        cxx, "-std=c++20", "-fsyntax-only", f"-I{tmp_path / 'stub'}", f"-I{include}",
        f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{cuda_include}", f"-I{CSRC}", str(CSRC / "sq_ops.cpp"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-6000:]


def test_fp16_fields_are_not_stored_from_a_cvt_register(tmp_path):
    """Regression guard: sq_store.cu must not st.u8 a cvt.rn.f16.f32 result (came out float-to-int on sm_90a, CUDA 13.0)."""
    ptx = tmp_path / "sq_store.ptx"
    cmd = [NVCC, "-ptx", "-std=c++17", "-O3", "-D__CUDA_NO_HALF_CONVERSIONS__", "-gencode=arch=compute_90a,code=sm_90a",
           f"-I{CSRC}", "-o", str(ptx), str(CSRC / "sq_store.cu")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = ptx.read_text()
    fp16_regs = set(re.findall(r"cvt\.rn\.f16\.f32\s+(%rs\d+)", text))
    stored = set(re.findall(r"st\.global\.u8\s+\[[^\]]+\],\s*(%rs\d+)", text))
    assert not fp16_regs & stored, f"fp16 conversion results stored byte-wise: {sorted(fp16_regs & stored)}"
