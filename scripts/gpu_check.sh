#!/usr/bin/env bash
# Every CUDA path kdtune claims, in one run on a GPU machine (under 8 minutes on one H100), results
# in one JSON file; --dry-run checks on the CPU that it would run. See scripts/gpu_check.py.
#   bash scripts/gpu_check.sh [--dry-run] [--out gpu_check.json]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
exec "$python" "$here/gpu_check.py" "$@"
