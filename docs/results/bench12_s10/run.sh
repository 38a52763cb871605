#!/bin/bash
# issue 12: the runtime bench before (2d41804^1, + the 1e6 -> 1000 ratio fix) and after the layout move, interleaved
PY=/work/main/.venv/bin/python
O=/work/main/runs/s10/bench12
lscpu | grep "Model name" > $O/cpu.txt; date -u >> $O/cpu.txt
for i in 1 2; do
  (cd /work/wt-premove && $PY -m hest_core.bench --repeats 3 --json $O/pre$i.json > $O/pre$i.log 2>&1)
  (cd /work/main && git stash list >/dev/null; $PY -m hest_core.bench --repeats 3 --json $O/post$i.json > $O/post$i.log 2>&1)
done
date -u >> $O/cpu.txt
