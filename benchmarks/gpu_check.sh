#!/usr/bin/env bash
# The GPU check (issue #14): every recipe's smoke preset on CUDA (bf16 where it trains a network), `torchbook
# generate` on a tiny random Llama, 1-process DDP and FSDP under torchrun, and the device-sensitive tests; one line
# per step; non-zero if any step failed. It runs the checkout itself (PYTHONPATH, no install, no torch pin), so it
# works on a machine with its own Python and CUDA build of torch; steps that need a package the machine lacks are
# skipped with a line saying so.
#
#   benchmarks/gpu_check.sh            # on a CUDA machine (under 5 minutes on one GPU)
#   benchmarks/gpu_check.sh --dry-run  # the same steps with device=cpu: the script tested on any machine
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${USE_SYSTEM_PYTHON:-}" ] && [ "${1:-}" = "--dry-run" ] && PYTHON=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" benchmarks/gpu_check.py "$@"
