"""Optional dependencies: which extra installs them, and a clear error when one is missing.

Serving needs only the core dependencies (plus vLLM). Calibration's report plots (matplotlib) and
its Ray sharding (ray) come with the ``[calibrate]`` extra, which ``make demo`` and ``make test``
install.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping

from vllm_spectralquant.errors import SpectralQuantError

CALIBRATE_EXTRA = "calibrate"


class MissingExtraError(SpectralQuantError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def install_hint(extra: str = CALIBRATE_EXTRA) -> str:
    return f'pip install "vllm-spectralquant[{extra}]"'


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(modules: Mapping[str, str], extra: str = CALIBRATE_EXTRA) -> None:
    """Raise MissingExtraError unless every module (name -> what it is needed for) is installed."""
    missing = [f"{name} ({why})" for name, why in modules.items() if not is_installed(name)]
    if missing:
        raise MissingExtraError(f"missing {', '.join(missing)}: install it with {install_hint(extra)}")
