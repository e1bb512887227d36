#!/bin/bash
# heavy job (issue 27 item 5): every edit's held-out row on one run of the embedded model
cd /work/main
PY=/work/main/.venv/bin/python
OUT=docs/results/data/edits_table_2026-12-07
RUN=runs/edits_table
mkdir -p $OUT
echo "lock acquired $(date -u)"; uptime
[ -d $RUN ] || cp -r runs/demo $RUN
[ -f $RUN/directions/som.safetensors ] || { echo "som start $(date -u)"; $PY -m refusal_atlas.cli directions som -r $RUN > $OUT/som.log 2>&1; echo "som rc $?"; }
[ -f $RUN/edits/ara.json ] || { echo "ara start $(date -u)"; $PY -m refusal_atlas.cli train-edit ara -r $RUN > $OUT/ara_train.log 2>&1; echo "ara rc $?"; }
echo "table start $(date -u)"; uptime
$PY scripts/edits_table.py --run-dir $RUN --out $OUT --ara ara --n 100 --tokens 64 --kl-tokens 16 --judges substring,meaning > $OUT/table_printed.txt 2>&1
echo "table rc $? end $(date -u)"; uptime
