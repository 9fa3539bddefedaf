#!/usr/bin/env bash
# The comparison of docs/results.md: {FL, LB} x {dense, DGC, Konečný sketch, STC} x {IID, Dirichlet(0.3)}
# on Fashion-MNIST with 10 simulated devices, plus a centralized baseline with the same model and the FL
# runs' number of epochs; then `edgetrain report`; and the short-round FL runs (`*-ls19`, `*-ls10`, `*-ls5`), three
# seeds each (SEEDS="0" for one), reported apart in docs/results/short-rounds/. About 100 minutes on 2 cores.
#   bash experiments/run_all.sh            # everything
#   bash experiments/run_all.sh 'fl-*'     # a subset (a glob over experiments/*.toml)
# Run outputs go to runs/experiments/ (bundles and checkpoints stay there, uncommitted); the small
# metrics.jsonl + summary.json of each run are copied to docs/results/runs/, where the report reads them.
set -euo pipefail
cd "$(dirname "$0")/.."
EDGETRAIN=${EDGETRAIN:-.venv/bin/python -m edgetrain}
RUNS=${RUNS:-runs/experiments}
KEEP=docs/results/runs
mkdir -p "$RUNS" "$KEEP"
source experiments/keep_run.sh  # keep NAME: the run without its per-device breakdown

for cfg in experiments/${1:-*}.toml; do
    name=$(basename "$cfg" .toml)
    case "$name" in
    i17-*) continue ;;  # issue 17's tables: experiments/run_17.sh runs them with their per-run flags
    *-ls[0-9]*)  # the short-round FL runs: one per seed (SEEDS, default "0 1 2"), kept as NAME-sSEED
        for seed in ${SEEDS:-0 1 2}; do
            rm -rf "${RUNS:?}/$name-s$seed"
            $EDGETRAIN simulate --config "$cfg" --seed "$seed" --label "$name, seed $seed" --out "$RUNS/$name-s$seed"
            keep "$name-s$seed"
        done ;;
    *)
        rm -rf "${RUNS:?}/$name"
        $EDGETRAIN simulate --config "$cfg" --out "$RUNS/$name"
        keep "$name" ;;
    esac
done
if [ -z "${1:-}" ] || [ "$1" = centralized ]; then
    $EDGETRAIN export --model cnn --runtime torch --seed 0 --out "$RUNS/centralized-bundle"
    rm -rf "${RUNS:?}/centralized"
    $EDGETRAIN train --bundle "$RUNS/centralized-bundle" --epochs 10 --threads 2 \
        --out "$RUNS/centralized" --label "centralized (10 epochs)"
    keep centralized
fi
short=("$KEEP"/*-ls[0-9]*)
matrix=()
for run in "$KEEP"/*; do [[ "$run" == *-ls[0-9]* || "$(basename "$run")" == i17-* ]] || matrix+=("$run"); done
if [ ${#matrix[@]} -gt 0 ]; then $EDGETRAIN report "${matrix[@]}" --out docs/results; fi
if [ -e "${short[0]}" ]; then $EDGETRAIN report "${short[@]}" --out docs/results/short-rounds; fi
