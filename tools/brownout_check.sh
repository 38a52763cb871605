#!/usr/bin/env bash
# issue 15: "no brownout at 1 and 4 clients" with brownout ON (server defaults: HEST_SLO_S=5,
# brownout from 0.5 x SLO), continuous batching, closed loop 1 and 4 workers, 60 requests each,
# CNN/DM test articles whole, r = 0.6 (the default), 64 new tokens, 2 threads, 16 rows.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
out=${OUT:-loadtest/results/$(date -u +%F)-brownout-on}  # OUT=DIR writes elsewhere
port=18777
mkdir -p "$out"
HEST_HOST=127.0.0.1 HEST_PORT=$port HEST_THREADS=2 HEST_ACCESS_LOG=false \
  $PY -m server >"$out/server.log" 2>&1 &
srv=$!
trap 'kill $srv 2>/dev/null; wait $srv 2>/dev/null || true' EXIT
echo "start $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"
$PY -m loadtest --url "http://127.0.0.1:$port" --wait-ready 300 --labels hest \
  --mode closed --concurrency 1,4 --max-requests 60 --warmup 1 --duration 3600 \
  --prompts ../shared/data/cnndm/test.jsonl --max-new-tokens 64 --slo 5 \
  --request-timeout 600 --drain 600 --no-progress --out "$out" >"$out/loadtest.log" 2>&1
echo "end $(date -u +%FT%TZ)"
