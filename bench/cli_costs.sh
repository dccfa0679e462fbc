#!/usr/bin/env bash
# Issue-2 figures: wall time and peak RSS of `slim compress` / `slim reconstruct` per method on
# the Rotten Tomatoes fine-tune (accuracy comes from the fidelity benchmark's rows).
# Run: bash bench/cli_costs.sh   (prints: name, compress wall time and peak RSS in KB,
# reconstruct wall time and peak RSS in KB, then the delta's size and search figures)
# CAL_N=128 sets the calibration size (default 192); ONLY="nps-0.01 nps-seeded-0.01" runs
# only the named rows (e.g. to time the searches alone on an idle machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"; CAL=$OUT/cal.jsonl
export CAL_N=${CAL_N:-192}; ONLY=${ONLY:-}
BASE=$($PY -c "from bench.finetune import base_model_dir; print(base_model_dir())")
FT=$($PY -c "from bench.finetune import make_finetune, full_recipe; print(make_finetune(full_recipe('rotten_tomatoes')))" | tail -1)
CAL=$CAL $PY - <<'PY'
import json
from bench.fidelity import calibration
import os
with open(os.environ['CAL'],'w') as f:
    for e in calibration('rotten_tomatoes', int(os.environ['CAL_N']), False):
        f.write(json.dumps({"text": e.text})+"\n")
PY
run() { # name, args...
  local name=$1; shift
  if [[ -n "$ONLY" && " $ONLY " != *" $name "* ]]; then return; fi
  /usr/bin/time -v .venv/bin/slim compress "$BASE" "$FT" -o $OUT/$name.slim --json "$@" > $OUT/$name.json 2> $OUT/$name.time
  /usr/bin/time -v .venv/bin/slim reconstruct "$BASE" $OUT/$name.slim -o $OUT/$name-rec > /dev/null 2> $OUT/$name-rec.time
  rm -rf $OUT/$name-rec
  echo "$name compress $(grep -E 'Elapsed|Maximum resident' $OUT/$name.time | awk '{print $NF}' | tr '\n' ' ') reconstruct $(grep -E 'Elapsed|Maximum resident' $OUT/$name-rec.time | awk '{print $NF}' | tr '\n' ' ') $(python3 -c "import json,sys; d=json.load(open('$OUT/$name.json')); print({k: d.get(k) for k in ('bits_per_param','stored_bytes','search_seconds','evaluations','fidelity')})")"
}
run lossless --method lossless
for k in 0.01 0.05; do
  run magnitude-$k --method magnitude --keep $k --value-bits 16
  run dare-$k --method dare --keep $k --value-bits 16
  run magnitude-scaled-$k --method magnitude-scaled --keep $k --value-bits 16 --calibration $CAL
done
run nps-0.01 --method nps --keep 0.01 --value-bits 16 --calibration $CAL
run nps-seeded-0.01 --method nps-seeded --keep 0.01 --value-bits 4 --calibration $CAL
