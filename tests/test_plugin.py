"""The vllm.general_plugins entry point, and the rule that only plugin/backend import vLLM."""

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from vllm_spectralquant.plugin import KV_CACHE_DTYPES


def test_entry_point_is_declared():
    eps = entry_points(group="vllm.general_plugins")
    assert any(ep.value == "vllm_spectralquant:register" for ep in eps)


def test_format_and_calibration_do_not_import_vllm():
    code = (
        "import sys, vllm_spectralquant.format, vllm_spectralquant.calibrate.pipeline, vllm_spectralquant.fidelity;"
        "import vllm_spectralquant.cli;"
        "bad = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.vllm
def test_register_is_idempotent_and_dtypes_validate(monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    import vllm_spectralquant

    vllm_spectralquant.register()
    vllm_spectralquant.register()
    from vllm.config.cache import CacheConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_spectralquant.backend.vllm_compat import known_kv_cache_dtypes

    known = known_kv_cache_dtypes()
    for name in KV_CACHE_DTYPES:
        assert known.count(name) == 1
        assert CacheConfig(cache_dtype=name).cache_dtype == name
    with pytest.raises(Exception, match="cache_dtype"):
        CacheConfig(cache_dtype="spectralquant_bogus")
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    assert parser.parse_args(["--kv-cache-dtype", "spectralquant_sq2_5bit"]).kv_cache_dtype == "spectralquant_sq2_5bit"
