#!/usr/bin/env bash
# The README's two commands:
#   ./run.sh demo [ARGS]   set up .venv/ and run the main job (lipcert demo; ARGS go to it)
#   ./run.sh test [ARGS]   set up .venv/ and run the test suite (ARGS go to pytest)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    demo)
        bash scripts/setup.sh
        exec .venv/bin/lipcert demo "$@"
        ;;
    test)
        bash scripts/setup.sh
        # Two workers: the suite takes about 5 minutes on 2 quiet cores (pass -n 0 to run serially).
        exec .venv/bin/python -m pytest -n 2 "$@"
        ;;
    *)
        echo "usage: ./run.sh demo|test [ARGS]" >&2
        exit 2
        ;;
esac
