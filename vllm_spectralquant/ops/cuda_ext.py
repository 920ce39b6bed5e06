"""The CUDA extension built from csrc/: torch custom ops ``torch.ops.spectralquant.{store_kv, decode_attention, gather_context}``.

Built JIT (``torch.utils.cpp_extension.load``) into a persistent cache,
``$SPECTRALQUANT_HOME/cuda-ext/<key>`` (default ``~/.cache/vllm-spectralquant/cuda-ext/<key>``), where the
key hashes the sources, the torch version, its CUDA version and the target archs. Why JIT and not an
install-time build: the package is pure Python (CPU CI, ``pip install`` without nvcc), and the binary
must match the torch ABI it runs under (vLLM pins its own torch), which only the running process knows.
A Docker image pre-builds it once, with no GPU, by running::

    TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0a" python -m vllm_spectralquant.ops.cuda_ext --build

Archs: ``TORCH_CUDA_ARCH_LIST`` when set; otherwise the visible GPU's (``9.0a`` on Hopper). The kernels
use mma.sync / movmatrix / cp.async, so sm_80 and newer work. ``SPECTRALQUANT_CUDA_BUILD=0`` forbids
building at run time (only a cached build is loaded).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

from vllm_spectralquant.format.paged import CacheGeometry
from vllm_spectralquant.format.params import LayerCodec
from vllm_spectralquant.ops.kernel_codec import KernelComponent, kernel_codec, padded_dim
from vllm_spectralquant.ops.workspace import DecodeWorkspace, default_workspace, num_splits, padded_group

log = logging.getLogger(__name__)

NAME = "cuda"

_SOURCES = ("sq_ops.cpp", "sq_store.cu", "sq_decode.cu", "sq_gather.cu")
_HEADERS = ("sq_launch.h", "sq_device.cuh", "sq_limits.h")
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0a"
# LoadMode (csrc/sq_launch.h): how a decode step stages 16 entries of one KV head.
_REGION16, _ROW4, _BYTES = 0, 1, 2

_state: dict[str, object] = {}


def source_dir() -> Path:
    """csrc/ next to the package (a source checkout / editable install) or inside it (a wheel)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "sq_ops.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"csrc/ with the CUDA sources not found next to {here}")


def _arch_list() -> str:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}a" if (major, minor) == (9, 0) else f"{major}.{minor}"
    return DEFAULT_ARCHS


def build_dir(archs: str) -> tuple[str, Path]:
    src = source_dir()
    digest = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        digest.update((src / name).read_bytes())
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{archs}".encode())
    name = f"spectralquant_ops_{digest.hexdigest()[:12]}"
    home = os.environ.get("SPECTRALQUANT_HOME")
    root = Path(home) / "cuda-ext" if home else Path.home() / ".cache" / "vllm-spectralquant" / "cuda-ext"
    return name, root / name


def build(verbose: bool = False) -> Path:
    """Compile (or reuse) and load the extension; returns its build directory."""
    from torch.utils import cpp_extension

    archs = _arch_list()
    name, path = build_dir(archs)
    path.mkdir(parents=True, exist_ok=True)
    src = source_dir()
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    try:
        cpp_extension.load(
            name=name,
            sources=[str(src / s) for s in _SOURCES],
            extra_include_paths=[str(src)],
            extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"],
            build_directory=str(path),
            is_python_module=False,
            verbose=verbose,
        )
    finally:
        if old is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old
    return path


def _load() -> bool:
    if "loaded" in _state:
        return bool(_state["loaded"])
    ok = False
    try:
        if hasattr(torch.ops, "spectralquant") and hasattr(torch.ops.spectralquant, "decode_attention"):
            ok = True
        else:
            # This process's archs first, then a portable pre-build (the Docker image's default list).
            libs = [(p / f"{n}.so") for n, p in (build_dir(_arch_list()), build_dir(DEFAULT_ARCHS))]
            lib = next((x for x in libs if x.is_file()), None)
            if lib is not None:
                torch.ops.load_library(str(lib))
                ok = True
            elif os.environ.get("SPECTRALQUANT_CUDA_BUILD", "1") != "0":
                log.warning("building the SpectralQuant CUDA extension into %s (once; minutes)", libs[0].parent)
                build()
                ok = True
    except Exception as exc:  # noqa: BLE001 - any build/load failure means "use Triton"
        log.warning("SpectralQuant CUDA extension unavailable: %s", exc)
        _state["error"] = repr(exc)
    _state["loaded"] = ok
    return ok


def is_available(device: torch.device | str = "cuda") -> bool:
    """True for CUDA tensors when the extension is built (building it now if allowed) and loadable."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available() and _load()


def load_error() -> str | None:
    return _state.get("error")  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def _decode_supports(head_dim: int, group: int, sink_tokens: int) -> bool:
    return bool(torch.ops.spectralquant.decode_supports(head_dim, group, sink_tokens))


def decode_supported(codec: LayerCodec, geometry: CacheGeometry, num_query_heads: int, window: int | None = None) -> bool:
    """Whether the built extension's decode kernel covers this shape (it answers; cached per shape).

    Sliding windows are not in the CUDA kernel: windowed calls go to the Triton decode.
    """
    if window is not None or num_query_heads % codec.num_kv_heads or not is_available():
        return False
    return _decode_supports(codec.head_dim, num_query_heads // codec.num_kv_heads, geometry.sink_tokens)


# ---- wrappers ----------------------------------------------------------------------------------------------


def _params(c: KernelComponent, *, decode: bool = True) -> list[torch.Tensor]:
    """The op's params list (csrc/sq_ops.cpp); slot 6 is the scale the op multiplies or divides by:
    encoding's for the store, decoding's (with the key gain) for decode and gather."""
    scale = c.decode_scale if decode else c.scale
    return [c.meta, c.lut32, c.lut16, c.basis, c.basis_t, c.mean, scale, c.pair_meta, c.pairs]


def _geometry_args(geometry: CacheGeometry, kc) -> dict[str, int]:
    """The named geometry arguments of every op (csrc/sq_ops.cpp, SQ_GEOMETRY_ARGS)."""
    return {
        "block_size": geometry.block_size, "slot_bytes": geometry.slot_bytes, "sink_bytes": geometry.sink_bytes,
        "sink_tokens": geometry.sink_tokens, "k_mode": kc.key.mode, "k_field": kc.key.field_offset,
        "v_mode": kc.value.mode, "v_field": kc.value.field_offset,
    }  # fmt: skip


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 else t.to(torch.int32)


def load_mode(kv_cache: torch.Tensor, geometry: CacheGeometry) -> tuple[int, int]:
    """(LoadMode, shared-memory pitch) for this cache's strides and alignment (host metadata only)."""
    s_blk, s_head, s_tok, _ = kv_cache.stride()
    c, s = geometry.page_slot_bytes, geometry.slot_bytes
    ptr = kv_cache.data_ptr()
    if geometry.block_size % 16 == 0 and s_tok == c and s_blk % 16 == 0 and s_head % 16 == 0 and ptr % 16 == 0:
        return _REGION16, c
    pitch = -(-s // 4) * 4
    pitch += 4 if (pitch // 4) % 2 == 0 else 0  # an odd number of words: rows start in different banks
    if c % 4 == 0 and s_tok % 4 == 0 and s_blk % 4 == 0 and s_head % 4 == 0 and ptr % 4 == 0:
        return _ROW4, pitch
    return _BYTES, pitch


def store_kv(key, value, kv_cache, slot_mapping, codec: LayerCodec, geometry: CacheGeometry) -> None:
    """See ``ops.dispatch.store_kv``."""
    kc = kernel_codec(codec, kv_cache.device)
    key = key if key.stride(2) == 1 else key.contiguous()
    value = value if value.stride(2) == 1 else value.contiguous()
    slots = slot_mapping if slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous() else slot_mapping.long().contiguous()
    torch.ops.spectralquant.store_kv(
        key, value, kv_cache, slots, kc.pad_start, _params(kc.key, decode=False), _params(kc.value, decode=False), **_geometry_args(geometry, kc)
    )


def decode_attention(
    query, kv_cache, block_table, seq_lens, codec: LayerCodec, geometry: CacheGeometry, softmax_scale: float, out,
    workspace: DecodeWorkspace | None = None, window: int | None = None,
) -> None:  # fmt: skip
    """See ``ops.dispatch.decode_attention``. Capture-safe when ``workspace`` is given (or already large enough)."""
    if window is not None:
        raise NotImplementedError("the CUDA decode kernel has no sliding window (decode_supported says so)")
    bsz = seq_lens.shape[0]
    if bsz == 0:
        return
    kc = kernel_codec(codec, kv_cache.device)
    h, d, hq = kc.num_kv_heads, kc.head_dim, query.shape[1]
    splits = num_splits(bsz, h, block_table.shape[1] * geometry.block_size, kv_cache.device)
    ws = workspace if workspace is not None else default_workspace(kv_cache.device)
    views = ws.views(bsz, hq, h, d, splits, grow=workspace is None)
    mode, pitch = load_mode(kv_cache, geometry)
    torch.ops.spectralquant.decode_attention(
        query, kv_cache, _int32(block_table), _int32(seq_lens), _params(kc.key), _params(kc.value),
        views.w16, views.wpar, views.part_o, views.part_ml, out, float(softmax_scale), **_geometry_args(geometry, kc),
        num_splits=splits, padded_dim=padded_dim(d), padded_group=padded_group(hq // h), load_mode=mode, pitch=pitch,
    )  # fmt: skip


def gather_context(kv_cache, block_table, seq_lens, codec: LayerCodec, geometry: CacheGeometry):
    """See ``ops.dispatch.gather_context`` (the output shape needs max(seq_lens): one host sync)."""
    kc = kernel_codec(codec, kv_cache.device)
    bsz = seq_lens.shape[0]
    max_len = int(seq_lens.max()) if bsz else 0
    k_out = torch.empty(bsz, max_len, kc.num_kv_heads, kc.head_dim, dtype=torch.float32, device=kv_cache.device)
    v_out = torch.empty_like(k_out)
    if bsz and max_len:
        torch.ops.spectralquant.gather_context(
            kv_cache, _int32(block_table), _int32(seq_lens), _params(kc.key), _params(kc.value), k_out, v_out,
            **_geometry_args(geometry, kc),
        )  # fmt: skip
    return k_out, v_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="store_true", help="compile the extension into the persistent cache")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return 0
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    path = build(verbose=args.verbose)
    print(f"built {path} for TORCH_CUDA_ARCH_LIST={_arch_list()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
