#!/usr/bin/env bash
# Create or reuse .venv, install synthgen with its test extras, and run the default test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k accounting
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
ensure_venv test
cd "$ROOT"
export TQDM_DISABLE=1
set +e
"$VENV/bin/python" -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treating that as a failure" >&2
    exit 1
fi
exit "$status"
