#!/usr/bin/env bash
# Check the layer contracts of pyproject.toml ([tool.importlinter]) with import-linter, over the
# layout a user installs: the design card's top-level folders become edgetrain.sdk, edgetrain.aggregator,
# … only in the built wheel (setuptools' package-dir), so lint the unpacked wheel, not the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$tmp/wheel" . >/dev/null
"$PY" -m zipfile -e "$tmp"/wheel/edgetrain-*.whl "$tmp/site"
# From inside the unpacked wheel: lint-imports puts its working directory first on sys.path, and the
# checkout's own edgetrain/ folder (the CLI alone) would shadow the installed package.
config=$PWD/pyproject.toml
linter=$(cd "$(dirname "$PY")" && pwd)/lint-imports
cd "$tmp/site" && PYTHONPATH="$tmp/site" "$linter" --no-cache "$config" "$@"
