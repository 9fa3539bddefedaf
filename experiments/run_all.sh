#!/usr/bin/env bash
# The comparison of docs/results.md (issue 16), every run kept, three seeds per configuration:
#   matrix: {FL 10 epoch rounds (E=1), FL 100 short rounds (19 local steps), LB 600 steps}
#           x {dense, DGC 99 %, Konečný sketch 2-bit, STC 99 %} x {IID, Dirichlet(0.3)}   24 configs, 72 runs
#   kept:   the runs docs/results.md cites beside the matrix (DGC 98.5 %, DGC + DGC downlink, STC 98 %,
#           STC 98 % + downlink, DGC 99.9 %, all short rounds IID)                           5 configs, 15 runs
#   extra:  the other experiments/*.toml (short rounds of 10 and 5 steps, 20 rounds, momentum correction,
#           server momentum, batch/group norm): `bash experiments/run_all.sh extra`            10 configs, 30 runs
# plus the centralized baseline, then `edgetrain report` over the kept runs. Each config runs once per seed in
# SEEDS (default "0 1 2"; the seed moves data order, partition and selection, so runs pair by seed) and is
# kept as docs/results/runs/NAME-sSEED (metrics.jsonl + summary.json, per-device breakdown stripped).
#
# Wall time (2 quiet cores), estimated from the kept runs' total_wall_s (summary.json) and a calibration
# (experiments/README of issue 16's report; rounds/steps of one config of each kind, timed in one sitting):
#   FL short rounds ~77 s of rounds (kept fl-*-ls19: 70-90 s, mean 77), FL epoch rounds ~75 s, LB 600 steps
#   ~95 s, plus ~15 s a run to start (bundle export, 10 device processes, final evaluation, plots).
#   matrix ~(24 x 3) x 102 s = ~2.0 h; kept +15 x 92 s = ~23 min; extra +30 runs = ~50 min; centralized ~1 min.
# So `bash experiments/run_all.sh` (matrix + kept + centralized) is ~2.4 h quiet; SEEDS="0 1" ~1.6 h.
# No round count was cut: none of the kept curves has flattened (the short-round runs still gain 0.2-0.5 pt
# per 10 rounds at round 100: docs/results/runs/fl-*-ls19-*), and the epoch-round and LB curves were lost.
#
#   bash experiments/run_all.sh                  # matrix + kept + centralized, then the reports
#   bash experiments/run_all.sh matrix           # one tier: matrix | kept | extra | centralized
#   bash experiments/run_all.sh 'fl-*-dir03*'    # any configs (a glob over experiments/*.toml)
#   DRY_RUN=1 bash experiments/run_all.sh matrix # list the configs a tier runs
#   SEEDS=0 RUNS=/tmp/r KEEP=/tmp/k EXTRA_FLAGS="--rounds 1 --limit-examples 64" bash experiments/run_all.sh 'lb-dense-iid'
# Run outputs go to $RUNS (default runs/experiments/; bundles and checkpoints stay there, uncommitted); the
# kept files go to $KEEP (default docs/results/runs/), where the report and experiments/check_results.py read
# them. EXTRA_FLAGS are added to every simulate (a CI-sized smoke of the pipeline; never for kept results).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
EDGETRAIN=${EDGETRAIN:-$PYTHON -m edgetrain}
RUNS=${RUNS:-runs/experiments}
KEEP=${KEEP:-docs/results/runs}
REPORT=${REPORT:-docs/results}
SEEDS=${SEEDS:-0 1 2}
read -r -a extra_flags <<< "${EXTRA_FLAGS:-}"
mkdir -p "$RUNS" "$KEEP"
source experiments/keep_run.sh  # keep NAME: the run without its per-device breakdown

CODECS="dense dgc sketch stc"
matrix() {
    for codec in $CODECS; do
        for data in iid dir03; do echo "fl-$codec-$data fl-$codec-$data-ls19 lb-$codec-$data"; done
    done
}
kept() { echo fl-dgc985-iid-ls19 fl-dgc-iid-ls19-down90 fl-stc98-iid-ls19 fl-stc98-down90-iid-ls19 fl-dgc999-iid-ls19; }
extra() {  # every config that is in no other tier (issue 17's have experiments/run_17.sh)
    local listed=" $(matrix | tr '\n' ' ') $(kept) "
    for cfg in experiments/*.toml; do
        local name; name=$(basename "$cfg" .toml)
        [[ "$listed" == *" $name "* || "$name" == i17-* ]] || echo "$name"
    done
}
configs() {  # the config names a command-line argument stands for
    case "$1" in
    matrix | kept | extra) "$1" ;;
    all) matrix; kept ;;
    centralized) ;;
    *) for cfg in experiments/$1.toml; do  # issue 17's need run_17.sh's per-run flags
           if [ -e "$cfg" ] && [[ "$(basename "$cfg")" != i17-* ]]; then basename "$cfg" .toml; fi
       done ;;
    esac
}
one_config() {  # one config, once per seed, kept as NAME-sSEED
    local name=$1 seed
    [ -e "experiments/$name.toml" ] || { echo "run_all: no experiments/$name.toml" >&2; exit 2; }
    for seed in $SEEDS; do
        rm -rf "${RUNS:?}/$name-s$seed"
        # the config's label names the group; summary.json records the seed (report groups by settings)
        $EDGETRAIN simulate --config "experiments/$name.toml" --seed "$seed" --out "$RUNS/$name-s$seed" \
            --log-level WARNING "${extra_flags[@]}"
        keep "$name-s$seed"
    done
}
centralized() {  # the same model trained on all the data for the FL runs' 10 epochs (one seed: no pairing)
    $EDGETRAIN export --model cnn --runtime torch --seed 0 --out "$RUNS/centralized-bundle"
    rm -rf "${RUNS:?}/centralized"
    $EDGETRAIN train --bundle "$RUNS/centralized-bundle" --epochs 10 --threads 2 \
        --out "$RUNS/centralized" --label "centralized (10 epochs)"
    keep centralized
}

what=${1:-all}
if [ -n "${DRY_RUN:-}" ]; then configs "$what"; exit 0; fi  # the config names only (tests/test_experiment_configs.py)
for name in $(configs "$what"); do one_config "$name"; done
if [ "$what" = all ] || [ "$what" = centralized ]; then centralized; fi
# The report over every kept run but issue 17's (experiments/run_17.sh reports those), then the check of
# docs/results.md's tables against the kept runs (a table the new runs changed is reported, not fatal).
runs=()
for run in "$KEEP"/*; do [[ "$(basename "$run")" == i17-* ]] || runs+=("$run"); done
if [ ${#runs[@]} -gt 0 ]; then $EDGETRAIN report "${runs[@]}" --out "$REPORT"; fi
$PYTHON experiments/check_results.py || echo "run_all: docs/results.md's tables differ from the kept runs (above)"
