#!/bin/bash
# HEST continuous and static batching, closed loop 1/4/8/16, 60 requests each,
# goodput within 5 s and TTFT <= 1 s / TPOT <= 0.1 s; run from anywhere, nothing else running.
# Session 15 wrote here; OUT=DIR writes elsewhere (session 16: loadtest/results/2026-12-01-s16-closed)
cd "$(dirname "$0")/../../.."   # the repository root
. .venv/bin/activate
OUT=${OUT:-loadtest/results/2026-12-01-s15-closed}
mkdir -p $OUT
for B in continuous static; do
  HEST_SLO_S=1000000 HEST_BATCHING=$B HEST_MAX_BATCH_SIZE=16 HEST_THREADS=2 HEST_PORT=8021 HEST_ACCESS_LOG=false python -m server > $OUT/server_$B.log 2>&1 &
  SPID=$!
  python -m loadtest --url http://127.0.0.1:8021 --wait-ready 600 --api openai --no-keepalive --labels hest-$B \
    --budget-ratio 0.6 --mode closed --concurrency 1,4,8,16 --max-requests 60 --warmup 1 --duration 3600 \
    --prompts ../shared/data/cnndm/test.jsonl --max-new-tokens 64 --slo 5 --slo-ttft 1 --slo-tpot 0.1 \
    --request-timeout 600 --drain 600 --no-progress --out $OUT/$B > $OUT/$B.log 2>&1
  echo "done $B rc $?"
  kill $SPID; wait $SPID 2>/dev/null
done

