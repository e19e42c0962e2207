#!/bin/sh
# `make demo`: from sample photos to verdicts in PostgreSQL, on this machine.
#   demo data (real crops + fakes from a generator trained here) → demo model (cached) → ONNX export →
#   database → a worker in the background → jobs submitted by a separate producer → wait → verdict table.
set -eu
BIN="${BIN:-.venv/bin}"
DEMO="${DEMO:-runs/demo}"
PHOTOS="${PHOTOS:-demo/photos}"
mkdir -p "$DEMO"
DEMO_ABS="$(cd "$DEMO" && pwd)"

# The demo's own database and Redis database number, so it never touches a real deployment's.
export PPL_DATABASE_URL="${PPL_DATABASE_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/ppl_demo}"
export PPL_BROKER_URL="${PPL_BROKER_URL:-redis://127.0.0.1:6379/5}"
export PPL_MODEL_DIR="$DEMO_ABS/model"
export PPL_FILE_ROOTS="$DEMO_ABS/data/submit"
export PPL_BACKEND="${PPL_BACKEND:-onnxruntime}"
export PPL_METRICS_PORT="${PPL_METRICS_PORT:-0}"
export PPL_BATCH_SIZE="${PPL_BATCH_SIZE:-16}"

step() { printf '\n== %s\n' "$*"; }

FRESH_DATABASE=""
if [ -f "$DEMO/model/model.onnx" ]; then
    step "demo model: cached in $DEMO/model (rm -rf $DEMO to rebuild)"
else
    FRESH_DATABASE=1  # a new demo model: start with an empty demo database, not an older model's verdicts
    rm -rf "$DEMO/data" "$DEMO/model"
    step "demo data: crops of $PHOTOS, and fakes from a generator trained on them"
    "$BIN/python" -m ppl_model.synthbench.demo --photos "$PHOTOS" --out "$DEMO/data"
    step "demo model: PPL with configs/tiny.toml (tiny ViT from scratch, CPU)"
    "$BIN/ppl" train --config configs/tiny.toml --data "$DEMO/data/train" --out "$DEMO/model" \
        --set data.layout=paired --no-progress
    step "export to ONNX"
    "$BIN/ppl" export --model "$DEMO/model"
fi

step "database: $PPL_DATABASE_URL"
if [ -n "$FRESH_DATABASE" ]; then
    "$BIN/ppl-worker" migrate --recreate-database
else
    "$BIN/ppl-worker" migrate --create-database
fi

step "worker: started in the background (log: $DEMO/worker.log)"
"$BIN/ppl-worker" run --hostname "demo@%h" > "$DEMO/worker.log" 2>&1 &
WORKER=$!
trap 'kill -TERM $WORKER 2>/dev/null; wait $WORKER 2>/dev/null || true' EXIT INT TERM

step "producer: submit $DEMO/data/submit (real/ and fake/) and wait for every answer"
"$BIN/ppl-worker" submit "$DEMO/data/submit" --wait --timeout 300

step "verdicts (ppl-worker verdicts)"
"$BIN/ppl-worker" verdicts --limit 200
echo
echo "Images under submit/real are real photos, those under submit/fake were made by the demo's generator."
echo "The demo model knows only that generator: see README, 'Training a detector', for a real one."

step "stopping the worker"
