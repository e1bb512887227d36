#!/bin/bash
# heavy job (issue 27 item 3): the three-objective search on a copy of the demo run, choice-likelihood scorer
cd /work/main
OUT=docs/results/data/capability_2026-12-07
mkdir -p $OUT
PY=/work/main/.venv/bin/python
export REFUSAL_ATLAS_QUIET=1
{ echo "lock acquired"; date -u; uptime; ps aux --sort=-%cpu | head -8; } > $OUT/machine_before.txt
rm -rf runs/demo_cap && cp -r runs/demo runs/demo_cap
start=$(date +%s)
$PY -m refusal_atlas.cli search edits -r runs/demo_cap --objective refusal,kl,basics --budget 16m --verify 0 \
  > $OUT/search_printed.txt 2> $OUT/search_stderr.txt
echo "search exit $? wall $(( $(date +%s) - start )) s" > $OUT/search_time.txt
cp runs/demo_cap/search_edits.json $OUT/
{ date -u; uptime; ps aux --sort=-%cpu | head -8; } > $OUT/machine_after_search.txt
$PY scripts/capability_vs_kl.py --run-dir runs/demo_cap --out $OUT --heldout > $OUT/agreement_printed.txt 2> $OUT/agreement_stderr.txt
echo "analysis exit $? wall $(( $(date +%s) - start )) s" >> $OUT/search_time.txt
{ date -u; uptime; ps aux --sort=-%cpu | head -8; } > $OUT/machine_after.txt
