#!/usr/bin/env bash
# The README's two commands:
#   ./run.sh demo [ARGS]   set up .venv/ and run the main job (the default preset)
#   ./run.sh test [ARGS]   set up .venv/ and run the test suite (ARGS go to pytest)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    demo)
        bash scripts/setup.sh
        out="runs/vit-mnist-lipschitz"
        if [ -f "$out/config.json" ]; then
            echo "reusing the finished run in $out (delete it to train again)"
        else
            .venv/bin/lipcert train --preset vit-mnist-lipschitz --out "$out" "$@"
        fi
        echo "run directory: $(pwd)/$out"
        ;;
    test)
        bash scripts/setup.sh
        exec .venv/bin/python -m pytest "$@"
        ;;
    *)
        echo "usage: ./run.sh demo|test [ARGS]" >&2
        exit 2
        ;;
esac
