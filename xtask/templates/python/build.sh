#!/bin/sh
# Builds {{name}}.wasm from app.py with componentize-py {{componentize_py}}.
#
# The componentize-py it uses: $COMPONENTIZE_PY if set, else .venv's, else one on the
# PATH; with none, the first run makes .venv and installs the pinned one there (PyPI).
set -eu
cd "$(dirname "$0")"
version={{componentize_py}}

if [ -n "${COMPONENTIZE_PY:-}" ]; then
    tool=$COMPONENTIZE_PY
elif [ -x .venv/bin/componentize-py ]; then
    tool=.venv/bin/componentize-py
elif command -v componentize-py >/dev/null 2>&1; then
    tool=componentize-py
else
    echo "installing componentize-py==$version into .venv (once)" >&2
    python3 -m venv .venv
    .venv/bin/pip install --disable-pip-version-check -q "componentize-py==$version"
    tool=.venv/bin/componentize-py
fi
case "$("$tool" --version)" in
    *" $version") ;;
    *) echo "warning: $tool is not componentize-py $version: the component may differ" >&2 ;;
esac

# Written aside, then renamed: a host watching this folder never loads half a file.
"$tool" -d wit -w device-handler componentize app -o {{name}}.wasm.partial
mv {{name}}.wasm.partial {{name}}.wasm
echo "built {{name}}.wasm" >&2
