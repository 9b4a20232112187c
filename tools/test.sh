#!/usr/bin/env bash
# Install cdfast with its test dependencies and run the test-suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q torch==2.13.0 setuptools wheel pybind11
pip install -q --no-build-isolation -e ".[test]"
python -m pytest -q
