# Sourced by experiments/run_*.sh: keep_run NAME copies $RUNS/NAME's summary.json and metrics.jsonl into
# $KEEP/NAME without the per-device breakdown of each round (a tenth the size; the report reads only the
# fleet-wide figures).
keep() {
    mkdir -p "$KEEP/$1" && cp "$RUNS/$1/summary.json" "$KEEP/$1/"
    .venv/bin/python -c 'import json, sys
for line in open(sys.argv[1]):
    record = json.loads(line); record.get("extra", {}).pop("devices", None); print(json.dumps(record))' \
        "$RUNS/$1/metrics.jsonl" > "$KEEP/$1/metrics.jsonl"
}
