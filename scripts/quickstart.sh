#!/usr/bin/env bash
# First run on a fresh machine: create .venv, install synthgen, then on real MNIST train a
# DP-SGD teacher, transcribe it into a student and a generator, evaluate, and print where the
# artifacts are. About 10-15 minutes on 2 CPU cores, install included.
#
# Settings can be overridden from the environment, e.g. QUICKSTART_EPSILON=10 scripts/quickstart.sh
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
ensure_venv test
cd "$ROOT"

EPSILON="${QUICKSTART_EPSILON:-4}"
DELTA="${QUICKSTART_DELTA:-1e-5}"
OUT="${QUICKSTART_OUT:-$ROOT/runs/quickstart}"
STEPS="${QUICKSTART_STEPS:-400}"
EPOCHS="${QUICKSTART_EPOCHS:-3}"
export SYNTHGEN_LEDGER="${SYNTHGEN_LEDGER:-$OUT/ledger.duckdb}"

DATA="$("$VENV/bin/python" -c "from synthgen.data import locate_dataset; print(locate_dataset('mnist'))")"
echo "MNIST: $DATA"
if [ -e "$OUT/student" ] || [ -e "$OUT/teacher" ]; then
    echo "$OUT already contains a quickstart run; remove it or set QUICKSTART_OUT to another folder" >&2
    exit 2
fi
mkdir -p "$OUT"

echo "== 1/2 train a teacher with DP-SGD at epsilon $EPSILON, delta $DELTA (example-level)"
"$VENV/bin/synthgen" train-teacher --data "$DATA" --out "$OUT/teacher" --dp --epsilon "$EPSILON" --delta "$DELTA" \
    --epochs "$EPOCHS" --batch-size 512 --lr 2e-3 --width 16 --hidden 64

echo "== 2/2 transcribe the DP teacher into a student and a generator (post-processing: no further privacy cost)"
"$VENV/bin/synthgen" transcribe --teacher "$OUT/teacher" --out "$OUT/run" --mechanism dp-teacher \
    --eval-data "$DATA" --steps "$STEPS" --eval-every 100

echo
echo "Artifacts in $OUT/run: generator/ and student/ (diffusers format), privacy_report.json, metrics.jsonl, samples.png"
echo "The teacher in $OUT/teacher is private: do not publish it."
