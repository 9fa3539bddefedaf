#!/usr/bin/env bash
# The comparison of docs/results.md (issue 16), every run kept, three seeds per configuration:
#   matrix: {FL 10 epoch rounds (E=1), FL 100 short rounds (19 local steps), LB 600 steps}
#           x {dense, DGC 99 %, Konečný sketch 2-bit, STC 99 %} x {IID, Dirichlet(0.3)}   24 configs, 72 runs
#   kept:   the runs docs/results.md cites beside the matrix (DGC 98.5 %, DGC + DGC downlink, STC 98 %,
#           STC 98 % + downlink, DGC 99.9 %, all short rounds IID)                           5 configs, 15 runs
#   frontier: issue 16's frontier (FL >= 500x, LB >= 1,000x in frames): DRIVE (Vargaftik et al. 2021)
#           1-bit rotated values on top-k positions, error feedback: FL short rounds 99 % / 99.8 %, LB
#           99 % / 99.9 %, IID: `bash experiments/run_all.sh frontier`                    4 configs, 12 runs
#   extra:  the other experiments/*.toml (short rounds of 10 and 5 steps, 20 rounds, momentum correction,
#           server momentum, batch/group norm): `bash experiments/run_all.sh extra`           12 configs, 36 runs
# plus the centralized baseline, then `edgetrain report` over the kept runs and experiments/check_results.py.
# Each config runs once per seed in SEEDS (default "0 1 2"; the seed moves data order, partition and selection,
# so runs pair by seed) and is kept as docs/results/runs/NAME-sSEED (metrics.jsonl + summary.json, per-device
# breakdown stripped).
#
# Wall time on 2 quiet cores (measured 2026-11-26 16:20-16:40 UTC, seed 0, one run at a time). The last
# session's measurement (~35 s a run of start-up, LB 0.23 s a step: matrix ~2.7 h, matrix + kept ~3.2 h) was
# cut by: no torch.optim in the torch runtime (its constructor imported torch._dynamo, ~1 CPU-s a device),
# one BLAS thread in simulate's aggregator and devices (OpenBLAS's idle workers spin on busy cores: LB step
# 0.21 -> 0.16 s), large-batch gradients summed in float32 blocks as FedAvg's are, the device commands'
# parser importing no server modules, and the configs' `device_processes = 2` (the 10 devices as identities
# of 2 device-host processes, same updates on the wire: start-up ~17 -> ~6 s a run, LB step 0.154 -> 0.141 s).
#   The sitting of 2026-11-26 (commit 5e6f58e, docs/results/sitting.json) measured, a run, start-up included:
#   FL epoch rounds (10 x E=1) 50-57 s, FL short rounds (100 x 19 steps) 59-71 s, LB (600 steps) 94-130 s
#   (the sketch's encode is the slowest); the matrix took 102 min (72 runs), the frontier 20 min
#   (12 runs), so matrix + frontier + centralized fit ~2 h; `kept` (15 short-round runs) adds ~18 min.
# No round count was cut: none of the kept curves had flattened (the short-round runs still gained 0.2-0.5 pt
# per 10 rounds at round 100).
# The sitting's commit, machine and times go to $REPORT/sitting.json.
#
#   bash experiments/run_all.sh                  # matrix + kept + centralized, then the reports
#   bash experiments/run_all.sh matrix kept      # tiers: matrix | kept | frontier | extra | centralized (in turn)
#   bash experiments/run_all.sh 'fl-*-dir03*'    # any configs (a glob over experiments/*.toml)
#   DRY_RUN=1 bash experiments/run_all.sh matrix # list the configs a tier runs
#   SEEDS="0 1" RUNS=/tmp/r KEEP=/tmp/k REPORT=/tmp/rep EXTRA_FLAGS="--rounds 2 --limit-examples 64" \
#       bash experiments/run_all.sh fl-dgc-iid-ls19 lb-stc-dir03     # the pipeline's smoke, ~4 min loaded
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
frontier() { echo fl-drive99-iid-ls19 fl-drive998-iid-ls19 lb-drive99-iid lb-drive999-iid; }
extra() {  # every config that is in no other tier (issue 17's have experiments/run_17.sh)
    local listed=" $(matrix | tr '\n' ' ') $(kept) $(frontier) "
    for cfg in experiments/*.toml; do
        local name; name=$(basename "$cfg" .toml)
        [[ "$listed" == *" $name "* || "$name" == i17-* ]] || echo "$name"
    done
}
configs() {  # the config names a command-line argument stands for
    case "$1" in
    matrix | kept | frontier | extra) "$1" ;;
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

[ $# -gt 0 ] || set -- all
if [ -n "${DRY_RUN:-}" ]; then  # the config names only (tests/test_experiment_configs.py)
    for what in "$@"; do configs "$what"; done
    exit 0
fi
# The sitting's record beside the kept runs: commit, machine and times (docs/results.md cites it).
sitting() {  # sitting START|END: write or complete $REPORT/sitting.json
    $PYTHON - "$1" "$REPORT/sitting.json" "$SEEDS" "$*" <<'PY'
import json, os, platform, subprocess, sys, time
import numpy, torch
when, path, seeds = sys.argv[1], sys.argv[2], sys.argv[3].split()
now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
if when == "END":
    record = json.load(open(path))
    record["finished_utc"] = now
else:
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    record = {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain", "--",
              ":!docs/results")), "started_utc": now, "finished_utc": None, "seeds": [int(s) for s in seeds],
              "tiers": sys.argv[4].split()[1:], "machine": {"cpu": cpu, "cores": os.cpu_count(),
              "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9),
              "arch": platform.machine(), "python": platform.python_version(), "numpy": numpy.__version__,
              "torch": torch.__version__}}
json.dump(record, open(path, "w"), indent=1)
PY
}
mkdir -p "$REPORT"
sitting START "$@"
for what in "$@"; do
    for name in $(configs "$what"); do one_config "$name"; done
    if [ "$what" = all ] || [ "$what" = centralized ]; then centralized; fi
done
sitting END
# The report over this comparison's kept runs (experiments/run_17.sh reports issue 17's), then the check of
# the results docs' tables against the kept runs (a table the new runs changed is reported, not fatal).
runs=()
for run in "$KEEP"/*; do  # not issue 17's, nor the 10- and 5-step runs of an earlier sitting (short-rounds.md)
    case "$(basename "$run")" in i17-* | *-ls10-* | *-ls5-*) ;; *) runs+=("$run") ;; esac
done
if [ ${#runs[@]} -gt 0 ]; then $EDGETRAIN report "${runs[@]}" --out "$REPORT"; fi
$PYTHON experiments/check_results.py || echo "run_all: the results docs' tables differ from the kept runs (above)"
