#!/usr/bin/env bash
# Issue 17's three small tables in docs/robustness.md, three seeds each (the seed moves data order and
# device selection), CI-sized (the mlp or cnn, few examples or steps, a few rounds): ~45 min on 2 loaded cores
# (robust ~34 min for 60 runs, dp ~4 min, stragglers ~6 min):
#   1. robust:     accuracy under each attack (2 of 10 devices) per aggregation rule  (experiments/i17-robust.toml);
#                  attacks none, scale, sign-flip, label-flip, random (ATTACKS="none scale" picks some) at the
#                  default strengths of sdk/attack.py (sign-flip -4x, scale 100x, label-flip boosted 10x)
#   2. dp:         DP-FedAvg accuracy vs epsilon, 100 identities, m = 50 a round     (experiments/i17-dp.toml);
#                  no DP and noise multipliers NOISE (default 0.3 1.0 3.0), clip 1, delta 1e-5
#   3. stragglers: wall time to 85/88 % for FedAvg vs FedBuff, 3 of 10 devices 5x slower (experiments/i17-stragglers.toml)
#   bash experiments/run_17.sh                 # all three
#   bash experiments/run_17.sh robust          # one table (robust | dp | stragglers)
# Outputs go to runs/experiments/; metrics.jsonl + summary.json (per-device breakdown stripped, as
# experiments/run_all.sh does) are kept in docs/results/runs/i17-*, which the tables' report markers name.
set -euo pipefail
cd "$(dirname "$0")/.."
EDGETRAIN=${EDGETRAIN:-.venv/bin/python -m edgetrain}
RUNS=${RUNS:-runs/experiments}
KEEP=docs/results/runs
SEEDS=${SEEDS:-0 1 2}
mkdir -p "$RUNS" "$KEEP"
source experiments/keep_run.sh  # keep NAME: the run without its per-device breakdown
# one_run CONFIG NAME LABEL [FLAG…]: three seeds of one configuration, kept as NAME-sSEED
one_run() {
    local cfg=$1 name=$2 label=$3; shift 3
    for seed in $SEEDS; do
        rm -rf "${RUNS:?}/$name-s$seed"
        $EDGETRAIN simulate --config "experiments/$cfg.toml" "$@" --seed "$seed" \
            --label "$label, seed $seed" --out "$RUNS/$name-s$seed" --log-level WARNING
        keep "$name-s$seed"
    done
}
robust() {  # attacks outer, so that a cut leaves whole attacks
    for attack in ${ATTACKS:-none scale sign-flip label-flip random}; do
        for rule in mean median trimmed-mean:beta=0.2 multi-krum:f=2; do
            local short=${rule%%:*} flags=(--aggregation "$rule")
            [ "$attack" = none ] || flags+=(--attackers "2:$attack")
            one_run i17-robust "i17-robust-$short-$attack" "$short, attack $attack" "${flags[@]}"
        done
    done
}
dp() {
    one_run i17-dp i17-dp-none "no DP"
    for z in ${NOISE:-0.3 1.0 3.0}; do
        one_run i17-dp "i17-dp-z$z" "DP z=$z, clip 1" --dp-clip 1 --dp-noise-multiplier "$z" --dp-delta 1e-5
    done
}
stragglers() {
    one_run i17-stragglers i17-stragglers-fedavg "FedAvg, 3 of 10 devices 5x slower" --strategy fedavg --rounds 60
    one_run i17-stragglers i17-stragglers-fedbuff "FedBuff K=5, 3 of 10 devices 5x slower" --strategy fedbuff --buffer 5 --rounds 120
}
for table in ${1:-robust dp stragglers}; do "$table"; done
