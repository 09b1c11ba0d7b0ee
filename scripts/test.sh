#!/usr/bin/env bash
# Install, then run the whole test suite (unit, actors, crash simulation, real FUSE mounts).
# RAZORFS_LONG=1 runs the long variants (many more crash points and operations).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
