#!/bin/bash
# HEST static and continuous batching in ONE loadtest run: both servers up, every closed-loop
# point (1/4/8/16 workers, 60 requests) run on static, then on continuous, before the next point
# (`loadtest --compare`: the idle server does no work), so a drift of the host's speed hits both
# modes of a point alike. Ratios continuous/static per point; goodput within 5 s and within
# TTFT <= 1 s / TPOT <= 0.1 s. Run from anywhere, nothing else running; OUT=DIR writes elsewhere,
# CONCURRENCY=8,16 and REQUESTS=160 change the points and the requests per point.
cd "$(dirname "$0")/../../.."   # the repository root
. .venv/bin/activate
OUT=${OUT:-loadtest/results/2026-12-01-s17-closed-ab}
CONCURRENCY=${CONCURRENCY:-1,4,8,16}
REQUESTS=${REQUESTS:-60}
mkdir -p $OUT
PIDS=()
for B in static continuous; do
  PORT=$([ $B = static ] && echo 8022 || echo 8021)
  HEST_SLO_S=1000000 HEST_BATCHING=$B HEST_MAX_BATCH_SIZE=16 HEST_THREADS=2 HEST_PORT=$PORT \
    HEST_ACCESS_LOG=false python -m server > $OUT/server_$B.log 2>&1 &
  PIDS+=($!)
done
python -m loadtest --compare http://127.0.0.1:8022 http://127.0.0.1:8021 --wait-ready 600 --api openai \
  --no-keepalive --labels hest-static hest-continuous --budget-ratio 0.6 --mode closed \
  --concurrency $CONCURRENCY --max-requests $REQUESTS --warmup 1 --duration 3600 \
  --prompts ../shared/data/cnndm/test.jsonl --max-new-tokens 64 --slo 5 --slo-ttft 1 --slo-tpot 0.1 \
  --request-timeout 600 --drain 600 --no-progress --out $OUT/ab > $OUT/ab.log 2>&1
echo "done rc $?"
kill "${PIDS[@]}"; wait "${PIDS[@]}" 2>/dev/null
