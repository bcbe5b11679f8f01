#!/usr/bin/env bash
# The two opt-in test groups, in a second venv, as CI runs them:
#   - `pytest -k comfyui` against each real ComfyUI source tree (tests/test_comfyui_e2e.py starts it);
#   - `pytest -m torchvision`: Kandinsky 5 image editing (i2i), which needs a torchvision that imports.
#
# The venv (.venv-comfyui, or $COMFYUI_VENV) has torch 2.14.1 + torchvision 0.29.1 (there is no CPU
# torchvision for .venv's torch 2.13 wheel), the newest tree's requirements.txt and this package with
# .ci/constraints.txt, in one resolve. It is made once and brought up to date when a recipe input changes.
# With COMFYUI_PYTHON set, that interpreter is used as it is and no venv is made (it needs pytest and
# this package importable: installed editable, or PYTHONPATH at this checkout).
# One venv serves both trees: the older tree's requirements differ only by older pins of ComfyUI's
# frontend, template and docs packages, which the browser UI uses and these tests (which talk to
# the HTTP API) do not; the mismatches are printed.
#
# Where the trees are:
#   COMFYUI_SOURCES   folder holding them (default: ../shared/comfyui beside this repository)
#   COMFYUI_VERSIONS  which subfolders to run, newest first (default: "v0.33.0 v0.8.0")
# Each tree is copied to a scratch folder first (the sources are read-only; ComfyUI writes under its
# root). A missing folder fails the run, saying which. Every selected test must run: a skip fails
# the run (TUNER_FAIL_ON_SKIP, tests/conftest.py), since a skipped opt-in group is a group not tested.
# Extra arguments go to each pytest call, e.g. `bash scripts/test_comfyui.sh -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${COMFYUI_VENV:-.venv-comfyui}
SOURCES=${COMFYUI_SOURCES:-../shared/comfyui}
read -r -a VERSIONS <<<"${COMFYUI_VERSIONS:-v0.33.0 v0.8.0}"
TORCH_PINS=$'torch==2.14.1\ntorchvision==0.29.1\n'

say() { echo "test_comfyui: $*"; }
die() { echo "test_comfyui: error: $*" >&2; exit 2; }
# pip lists every local index folder it cannot use as a warning; nothing else is dropped.
pip_q() { "$VENV/bin/python" -m pip -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

[ -d "$SOURCES" ] || die "no ComfyUI source trees at '$SOURCES' (resolved from $ROOT).
  Set COMFYUI_SOURCES to the folder that holds ${VERSIONS[*]} (the copy of shared/comfyui beside the clone)."
SOURCES=$(cd "$SOURCES" && pwd)
for v in "${VERSIONS[@]}"; do
  [ -f "$SOURCES/$v/main.py" ] || die "no ComfyUI tree at $SOURCES/$v (main.py missing).
  Set COMFYUI_VERSIONS to the subfolders of $SOURCES to test, or COMFYUI_SOURCES to where they are."
done
NEWEST="$SOURCES/${VERSIONS[0]}"

# ------------------------------------------------------------------ the venv
pins=$(mktemp)
scratch=$(mktemp -d "${TMPDIR:-/tmp}/comfyui-trees.XXXXXX")
trap 'rm -rf "$pins" "$scratch"' EXIT
printf '%s' "$TORCH_PINS" >"$pins"
stamp=$(cat "$NEWEST/requirements.txt" .ci/constraints.txt pyproject.toml "$pins" | sha256sum | cut -c1-16)
if [ -n "${COMFYUI_PYTHON:-}" ]; then
  say "using COMFYUI_PYTHON=$COMFYUI_PYTHON as it is (no venv made)"
elif [ "$(cat "$VENV/.recipe" 2>/dev/null)" != "$stamp" ] || ! "$VENV/bin/python" -c "import torchvision, trainer_core" 2>/dev/null; then
  t0=$SECONDS
  say "building $VENV (torch 2.14.1 + torchvision 0.29.1, ComfyUI ${VERSIONS[0]}'s requirements, this package)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  pip_q install torch==2.14.1 torchvision==0.29.1
  pip_q install -c "$pins" -c .ci/constraints.txt -r "$NEWEST/requirements.txt" -e ".[dev]"
  "$VENV/bin/python" -c "import torch, torchvision, trainer_core; print('test_comfyui: torch', torch.__version__, 'torchvision', torchvision.__version__)"
  echo "$stamp" >"$VENV/.recipe"
  say "venv ready in $((SECONDS - t0)) s"
fi
[ -n "${COMFYUI_PYTHON:-}" ] || COMFYUI_PYTHON="$(cd "$VENV" && pwd)/bin/python"
export COMFYUI_PYTHON TUNER_FAIL_ON_SKIP=1

# Which of each tree's requirements the venv does not meet (printed, not fatal: the tests decide).
for v in "${VERSIONS[@]}"; do
  "$COMFYUI_PYTHON" - "$SOURCES/$v/requirements.txt" "$v" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.requirements import InvalidRequirement, Requirement

path, name = sys.argv[1:]
for line in open(path):
    line = line.split("#", 1)[0].strip()
    try:
        req = Requirement(line) if line else None
    except InvalidRequirement:
        continue
    if req is None or (req.marker and not req.marker.evaluate()):
        continue
    try:
        have = version(req.name)
    except PackageNotFoundError:
        have = None
    if have is None or not req.specifier.contains(have, prereleases=True):
        print(f"test_comfyui: note: ComfyUI {name} asks for {req}, the venv has {have or 'none'}")
EOF
done

# ------------------------------------------------------------------ the groups
status=0
for v in "${VERSIONS[@]}"; do
  t0=$SECONDS
  cp -r "$SOURCES/$v" "$scratch/$v"
  chmod -R u+w "$scratch/$v"
  say "pytest -k comfyui against ComfyUI $v (a copy in $scratch/$v)"
  COMFYUI_DIR="$scratch/$v" "$COMFYUI_PYTHON" -m pytest -q -k comfyui "$@" || status=1
  rm -rf "${scratch:?}/$v"
  say "ComfyUI $v: $((SECONDS - t0)) s"
done
t0=$SECONDS
say "pytest -m torchvision (Kandinsky 5 i2i)"
"$COMFYUI_PYTHON" -m pytest -q -m torchvision "$@" || status=1
say "torchvision group: $((SECONDS - t0)) s"
exit $status
