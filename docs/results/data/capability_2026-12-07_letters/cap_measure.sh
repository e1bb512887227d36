#!/bin/bash
# capability objective measurement on a copy of the demo run (issue 27 item 3); run under flock /work/tools/heavy.lock
cd /work/wt-cap
OUT=docs/results/data/capability_2026-12-07
mkdir -p $OUT
export PYTHONPATH=/work/wt-cap/runs/cap_src REFUSAL_ATLAS_QUIET=1
PY=/work/main/.venv/bin/python
{ echo "lock acquired"; date -u; uptime; ps aux --sort=-%cpu | head -8; } > $OUT/machine_before.txt
rm -rf runs/demo_cap && cp -r /work/main/runs/demo runs/demo_cap
start=$(date +%s)
# the session's deadline: trials until 10:44 UTC at most, 30 minutes at most (a time budget stops before a trial
# that would start after it, so search_edits.json is always written)
left=$(( ( $(date -d "10:44" +%s) - $(date +%s) ) / 60 ))
[ $left -gt 30 ] && left=30
echo "time budget ${left} min" > $OUT/search_budget.txt
[ $left -lt 4 ] && { echo "too late: ${left} min left" >> $OUT/search_budget.txt; exit 0; }
$PY -m refusal_atlas.cli search edits -r runs/demo_cap --objective refusal,kl,basics --budget ${left}m --verify 0 \
  > $OUT/search_printed.txt 2> $OUT/search_stderr.txt
echo "search exit $? wall $(( $(date +%s) - start )) s" > $OUT/search_time.txt
cp runs/demo_cap/search_edits.json $OUT/ 2>/dev/null
{ date -u; uptime; ps aux --sort=-%cpu | head -8; } > $OUT/machine_after_search.txt
$PY runs/cap_src/capability_vs_kl.py --run-dir runs/demo_cap --out $OUT --heldout > $OUT/agreement_printed.txt 2> $OUT/agreement_stderr.txt
echo "analysis exit $? wall $(( $(date +%s) - start )) s" >> $OUT/search_time.txt
{ date -u; uptime; ps aux --sort=-%cpu | head -8; } > $OUT/machine_after.txt
