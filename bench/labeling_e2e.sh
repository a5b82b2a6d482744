#!/bin/bash
# The labeling service end to end with the difficulty-aware simulated crowd, through the HTTP API:
# 200 work images from the model's test split, 48 gold from its val split (bench/data/labeling-difficulty.csv),
# no broker needed (images added from files). Usage: bench/labeling_e2e.sh [CROWD] [SEED]
#   bench/labeling_e2e.sh "good:3,typical:11,careless:3,biased:3" 1     # about 3 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
CROWD=${1:-good:3,typical:11,careless:3,biased:3}
SEED=${2:-1}
B=$(mktemp -d)
DATA=${PT_KERMANY:-../shared/data/kermany224/train}
mkdir -p "$B"/test/NORMAL "$B"/test/PNEUMONIA "$B"/val/NORMAL "$B"/val/PNEUMONIA
while IFS=, read -r file label _patient split _margin _p; do
  [ "$file" = file ] && continue
  cls=$([ "$label" = pneumonia ] && echo PNEUMONIA || echo NORMAL)
  ln -s "$(realpath "$DATA/$cls/$file")" "$B/$split/$cls/$file"
done < bench/data/labeling-difficulty.csv
export PT_DATA_DIR=$B/var PT_SECRET_KEY=dev PT_LABELING_UNDO_WINDOW_S=2 PT_LABELING_HTTP_PORT=${PORT:-18779}
PT="${PYTHON:-.venv/bin/python} -m services.cli"
$PT labeling add-user owner --role owner --password owner-pass
$PT labeling import-gold --data "$B/val" --n 48
$PT labeling add-images --data "$B/test" --n 200 --seed 11
$PT labeling > "$B/service.log" 2>&1 &
SVC=$!
trap 'kill $SVC 2>/dev/null || true' EXIT
for _ in $(seq 90); do curl -sf "http://127.0.0.1:$PT_LABELING_HTTP_PORT/healthz" >/dev/null && break; sleep 1; done
$PT labeling simulate-crowd --url "http://127.0.0.1:$PT_LABELING_HTTP_PORT" --annotators "$CROWD" \
  --truth "$B/test" --truth "$B/val" --owner owner --owner-password owner-pass --seed "$SEED" \
  --difficulty bench/data/labeling-difficulty.csv --json-out "$B/crowd.json"
echo "result: $B/crowd.json"
