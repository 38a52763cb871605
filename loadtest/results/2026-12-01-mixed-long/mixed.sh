#!/bin/bash
# Issue 16 item 5: short requests at ~half saturation, with and without one ~4k-token prompt every
# 10 s, under the prefill token budget (512) and without it (0). Same seed, same prompts.
# CLIENT_NICE=N runs the load client at nice N (it shares the cores with the server; session 14).
set -u
cd "$(dirname "$0")/../../.."   # the repository root
. .venv/bin/activate
OUT=${OUT:-runs/mixed}; mkdir -p $OUT
LONG=${LONG:-runs/digests/digests_4096.jsonl}   # python -m training.digests --lengths 4096 --out runs/digests
for PT in ${PTS:-512 0}; do
  HEST_DECODE_STEPS_PER_CHUNK=${K:-0} HEST_PREFILL_TOKENS=$PT HEST_PORT=8011 HEST_ACCESS_LOG=false python -m server > $OUT/server_pt$PT.log 2>&1 &
  SPID=$!
  for MIX in none long; do
    EXTRA=""
    [ $MIX = long ] && EXTRA="--long-prompts $LONG --long-every 10"
    ${CLIENT_NICE:+nice -n $CLIENT_NICE} python -m loadtest --url http://127.0.0.1:8011 --wait-ready 300 --mode poisson --rate ${RATE:-1.5} \
      --duration 60 --max-requests 200 --drain 120 --prompts ../shared/data/cnndm/test.jsonl \
      --budget-ratio 0.6 --max-new-tokens 64 --slo 5 --seed 0 --warmup 2 --no-progress \
      --labels "hest-pt$PT-$MIX" $EXTRA --out $OUT/pt$PT-$MIX > $OUT/pt$PT-$MIX.log 2>&1
    echo "done pt$PT $MIX rc $?"
  done
  kill $SPID; wait $SPID 2>/dev/null
done
