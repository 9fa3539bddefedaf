#!/usr/bin/env bash
# A board in a box: an emulated Linux aarch64 device (Debian bookworm arm64, Raspberry Pi OS's base, run
# by user-mode QEMU — no binfmt registration, no kernel setting touched) joins a fleet on a Mosquitto on
# the host's loopback, trains a few local steps and sends its update; the aggregator runs on the host.
# Succeeds (exit 0) only when the aggregator accepted the board's update.
#
#   scripts/board.sh [--runtime torch|onnxgraph] --out DIR [--local-steps K] [--limit-examples N]
#
# DIR gets the aggregator's run directory (metrics.jsonl, summary.json, checkpoints) plus board.txt
# (the figures printed at the end). The rootfs and the aarch64 wheels are cached under
# $EDGETRAIN_BOARD_CACHE (default ~/.cache/edgetrain-board), so a second run skips the downloads.
# Timings printed are EMULATED (QEMU on this host), not a board's; peak RSS, what installs and whether
# the update is accepted are real. See docs/runtimes-on-boards.md.
set -euo pipefail

RUNTIME=onnxgraph
OUT=""
LOCAL_STEPS=3
LIMIT=320
TIMEOUT_S=900
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) RUNTIME=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --local-steps) LOCAL_STEPS=$2; shift 2 ;;
        --limit-examples) LIMIT=$2; shift 2 ;;
        --timeout) TIMEOUT_S=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "board.sh: unknown argument $1" >&2; usage ;;
    esac
done
[ -n "$OUT" ] || { echo "board.sh: --out DIR is required" >&2; usage; }
case "$RUNTIME" in
    # torch <= 2.10.0 is the last CPU build of torch for Linux aarch64 on PyPI (2.11+ are CUDA builds).
    torch) EXTRA=torch; PINNED=("torch==2.10.0") ;;
    # onnxruntime 1.32.0 aarch64 segfaults at import under QEMU 7.2 user mode; 1.22.1 works.
    onnxgraph) EXTRA=onnxgraph; PINNED=("onnxruntime==1.22.1") ;;
    *) echo "board.sh: --runtime must be torch or onnxgraph, not $RUNTIME" >&2; exit 2 ;;
esac
for n in "$LOCAL_STEPS" "$LIMIT" "$TIMEOUT_S"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "board.sh: expected a positive integer, got '$n'" >&2; exit 2; }
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
DATA_DIR=${EDGETRAIN_DATA_DIR:-/usr/share/datasets/fashion-mnist}
CACHE=${EDGETRAIN_BOARD_CACHE:-$HOME/.cache/edgetrain-board}
SUITE=bookworm
ROOT=$CACHE/rootfs-$SUITE-arm64
BOARD_PY=$ROOT/usr/bin/python3.11
mkdir -p "$OUT" "$CACHE"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/edgetrain-board.XXXXXX")
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' INT TERM  # so that the EXIT trap stops the broker and the device
say() { echo "board: $*"; }
elapsed() { echo $(( $(date +%s) - $1 )); }
on_board() { qemu-aarch64-static -L "$ROOT" "$BOARD_PY" "$@"; }

# 1. Host tools (Debian packages); nothing else on the host changes.
need=()
command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    say "installing ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
DEBOOTSTRAP=$(command -v debootstrap || echo /usr/sbin/debootstrap)

# 2. The board's userland: debootstrap --foreign only unpacks the base, so the extra packages it
# downloaded (python3 and its dependencies) are unpacked by hand. Built aside, then renamed: a
# half-made rootfs is never taken for a cached one.
if [ ! -f "$ROOT/.edgetrain-complete" ]; then
    started=$(date +%s)
    say "building the $SUITE arm64 rootfs in $ROOT (once; ~1 min)"
    rm -rf "$ROOT.partial" "$ROOT"
    "$DEBOOTSTRAP" --foreign --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates "$SUITE" "$ROOT.partial" \
        >"$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    for deb in "$ROOT.partial"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$ROOT.partial"; done
    touch "$ROOT.partial/.edgetrain-complete"
    mv "$ROOT.partial" "$ROOT"
    say "rootfs ready in $(elapsed "$started") s"
fi
say "board python: $(on_board -c 'import platform, sys; print(platform.machine(), sys.version.split()[0])')"

# 3. aarch64 wheels, fetched on the host. Not resolved here: `pip download --platform` evaluates
# environment markers for the host (x86_64), so torch's x86-only CUDA requirements would be chased.
# The pinned runtime comes without its dependencies; those (pure Python, or with aarch64 wheels)
# are fetched beside it, and the emulated pip resolves the real set — markers evaluated on aarch64.
# The device core's requirements come from pyproject.toml (a new core dependency is fetched without an
# edit here); the cache folder is named by a digest of them, so a changed list is fetched afresh.
CORE_DEPS=$("$PY" - "$REPO/pyproject.toml" <<'PYEOF'
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print(" ".join(d.split(";")[0].replace(" ", "") for d in deps if ";" not in d))  # marker'd: not for 3.11
PYEOF
)
read -r -a CORE_DEPS <<<"$CORE_DEPS"
WHEELS=$CACHE/wheels-$RUNTIME-$(printf '%s\n' "${CORE_DEPS[@]}" "${PINNED[@]}" | sha256sum | cut -c1-12)
if [ ! -f "$WHEELS/.edgetrain-complete" ]; then
    started=$(date +%s)
    say "downloading aarch64 wheels into $WHEELS (once)"
    rm -rf "$WHEELS"
    mkdir -p "$WHEELS"
    download=("$PY" -m pip download -q --disable-pip-version-check --only-binary=:all:
              --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64
              --platform manylinux2014_aarch64 --python-version 3.11 --implementation cp -d "$WHEELS")
    "${download[@]}" --no-deps "${PINNED[@]}"
    "${download[@]}" "${CORE_DEPS[@]}"  # with their dependencies (cryptography brings cffi): none is x86-marked
    case "$RUNTIME" in
        torch) "${download[@]}" filelock 'typing-extensions>=4.10' 'sympy>=1.13.3' 'networkx>=2.5.1' jinja2 \
                   'fsspec>=0.8.5' ;;
        onnxgraph) "${download[@]}" coloredlogs flatbuffers packaging protobuf sympy ;;
    esac
    touch "$WHEELS/.edgetrain-complete"
    say "wheels ready in $(elapsed "$started") s"
fi

# 4. Our wheel, built from this checkout (no build isolation: the host venv has setuptools).
mkdir -p "$WORK/ours"
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$WORK/ours" "$REPO" \
    >"$WORK/wheel.log" 2>&1 || { cat "$WORK/wheel.log" >&2; exit 1; }
OUR_WHEEL=$(ls "$WORK"/ours/edgetrain-*.whl)

# 5. Install inside the board with the emulated pip, offline: `edgetrain[EXTRA]` resolves there, with
# aarch64's markers. The dependencies' install is cached, keyed by the wheel set and our requirements;
# our own wheel is installed fresh every run.
key=$( { ls "$WHEELS"; unzip -p "$OUR_WHEEL" '*/METADATA' | grep '^Requires-Dist'; } | sha256sum | cut -c1-16)
SITE=$CACHE/site-$RUNTIME-$key
install_s=cached
if [ ! -f "$SITE/.edgetrain-complete" ]; then
    started=$(date +%s)
    say "installing edgetrain[$EXTRA] inside the board (emulated pip, offline)"
    rm -rf "$SITE" "$SITE.partial"
    on_board -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" \
        --find-links "$WORK/ours" --target "$SITE.partial" "edgetrain[$EXTRA]" \
        >"$WORK/install.log" 2>&1 || { cat "$WORK/install.log" >&2; exit 1; }
    rm -rf "$SITE.partial"/edgetrain "$SITE.partial"/edgetrain-*.dist-info  # ours comes per run
    touch "$SITE.partial/.edgetrain-complete"
    mv "$SITE.partial" "$SITE"
    install_s="$(elapsed "$started") s emulated"
fi
on_board -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$WORK/site-ours" \
    "$OUR_WHEEL" >"$WORK/install-ours.log" 2>&1 || { cat "$WORK/install-ours.log" >&2; exit 1; }
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1

# 6. The fleet: a private Mosquitto on a free loopback port, the aggregator on the host, the device on
# the board. The bundle is exported on the host (torch is a host tool), for the runtime under test.
"$PY" -m edgetrain export --model cnn --runtime "$RUNTIME" --out "$WORK/bundle" >"$WORK/export.log" 2>&1 \
    || { cat "$WORK/export.log" >&2; exit 1; }
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$PORT" >"$WORK/mosquitto.conf"
"$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
PIDS+=($!)
BROKER=mqtt://127.0.0.1:$PORT
FLEET=board
DEVICE=board-aarch64-$RUNTIME
RUN=$OUT/run
rm -rf "$RUN"
started=$(date +%s)
# from $WORK: `-m` puts the working directory first on sys.path, and the checkout's edgetrain/ is not
# the installed package
(cd "$WORK" && exec env PYTHONPATH="$WORK/site-ours:$SITE" qemu-aarch64-static -L "$ROOT" "$BOARD_PY" -m edgetrain device \
    --broker "$BROKER" --fleet "$FLEET" --device-id "$DEVICE" --bundle "$WORK/bundle" --data-dir "$DATA_DIR" \
    --limit-examples "$LIMIT" --state-dir "$WORK/state" --threads 1 --power-source none \
    >"$OUT/device.log" 2>&1) &
DEVICE_PID=$!
PIDS+=("$DEVICE_PID")
set +e
timeout "$TIMEOUT_S" "$PY" -m edgetrain aggregate --broker "$BROKER" --fleet "$FLEET" \
    --bundle "$WORK/bundle" --out "$RUN" --rounds 1 --min-devices 1 --local-steps "$LOCAL_STEPS" \
    --batch-size 32 --round-timeout "$TIMEOUT_S" --join-timeout "$TIMEOUT_S" --eval-examples 500 \
    --data-dir "$DATA_DIR" >"$OUT/aggregator.log" 2>&1
aggregate_rc=$?
set -e
round_s=$(elapsed "$started")
# the device's own peak RSS as the host sees it (the QEMU process: emulator + Python), before it stops
host_peak_kb=$(awk '/^VmHWM/ {print $2}' "/proc/$DEVICE_PID/status" 2>/dev/null || echo 0)

# 7. The verdict and the figures.
"$PY" - "$RUN" "$DEVICE" "$aggregate_rc" "$host_peak_kb" "$round_s" "$install_s" "$WHEELS" "$OUR_WHEEL" \
    "$SITE" "$RUNTIME" "$OUT/board.txt" <<'EOF'
import json, pathlib, platform, sys, time
run, device, rc, host_peak_kb, round_s, install_s, wheels, ours, site, runtime, report = sys.argv[1:]
run = pathlib.Path(run)
lines = [f"board in a box, runtime {runtime}: {time.strftime('%Y-%m-%d')}, host {platform.machine()} "
         f"{platform.node()}, emulated aarch64 (qemu-aarch64-static, Debian bookworm arm64)"]
summary_path = run / "summary.json"
summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
           if line.strip()] if (run / "metrics.jsonl").is_file() else []
values = {}
for record in records:
    values = record.get("extra", {}).get("devices", {}).get(device, values)
accepted = int(summary.get("updates_accepted", 0))
files = [p for p in sorted(pathlib.Path(wheels).glob("*.whl")) if p.name.split("-")[0].lower() != "edgetrain"]
names = {p.name.lower() for p in pathlib.Path(site).iterdir()}
installed = [p for p in files if any(n.startswith(p.name.split("-")[0].lower() + "-") and n.endswith(".dist-info")
                                      for n in names)]
lines.append("wheels installed on the board:")
for p in [*installed, pathlib.Path(ours)]:
    lines.append(f"  {p.name:70s} {p.stat().st_size / 1e6:8.1f} MB")
size = sum(f.stat().st_size for f in pathlib.Path(site).rglob("*") if f.is_file())
lines.append(f"installed size: {size / 1e6:.0f} MB (dependencies; emulated pip install: {install_s})")
step, p95 = values.get("step_mean_ms"), values.get("step_p95_ms")
lines.append(f"device peak RSS: {values.get('peak_rss_mb', float('nan')):.0f} MB (device's report), "
             f"{int(host_peak_kb) / 1024:.0f} MB (host's view of the QEMU process)")
lines.append(f"step time (EMULATED, not a board's): mean {step if step is None else round(step)} ms, "
             f"p95 {p95 if p95 is None else round(p95)} ms over {values.get('steps')} steps; "
             f"first round incl. start-up and import: {round_s} s (EMULATED)")
lines.append(f"round 1: updates accepted {accepted}, rejected {summary.get('updates_rejected', '?')}; "
             f"test accuracy {records[-1].get('accuracy') if records else None}")
verdict = int(rc) == 0 and accepted >= 1
lines.append("OK: the aggregator accepted the board's update" if verdict
             else f"FAILED: aggregator exit {rc}, updates accepted {accepted} (see device.log, aggregator.log)")
text = "\n".join(lines)
print(text)
pathlib.Path(report).write_text(text + "\n")
sys.exit(0 if verdict else 1)
EOF
