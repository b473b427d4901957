#!/usr/bin/env bash
# Opens a run's report.html and its TensorBoard (and the Ray dashboard, if one is up) in headless Chromium and
# saves screenshots: the browser check of what users look at.
#
#   scripts/screenshots.sh RUN_FOLDER [OUT_DIR]      (Debian: apt-get install chromium)
#
# Exits 0 with a note when Chromium is not installed, so CI can call it unconditionally.
set -euo pipefail

run=$(realpath "${1:?usage: scripts/screenshots.sh RUN_FOLDER [OUT_DIR]}")
out=$(realpath -m "${2:-$run/screenshots}")
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -z "$browser" ]]; then
    echo "screenshots: no Chromium installed (apt-get install chromium); skipped"
    exit 0
fi
python=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
[[ -x "$python" ]] || python=python3
mkdir -p "$out"

shoot() {  # URL FILE: a full-height page, after its scripts had time to draw
    timeout 90 "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,2400 \
        --virtual-time-budget=15000 --screenshot="$2" "$1" >/dev/null 2>&1
    [[ -s "$2" ]] || { echo "screenshots: Chromium saved nothing for $1" >&2; exit 1; }
    echo "screenshots: $1 -> $2"
}

shoot "file://$run/report.html" "$out/report.png"

port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
"$python" -m pipeline dashboard "$run" --port "$port" >"$log" 2>&1 &
board=$!
trap 'kill $board 2>/dev/null || true; wait $board 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 120); do grep -q "^Ray dashboard:" "$log" && break; sleep 0.5; done
tensorboard=$(awk '/^TensorBoard:/ {print $2}' "$log")
[[ -n "$tensorboard" ]] || { echo "screenshots: the dashboard command did not start:" >&2; cat "$log" >&2; exit 1; }
sleep 5  # TensorBoard's first scan of the event files
shoot "${tensorboard}#timeseries" "$out/tensorboard-scalars.png"
shoot "${tensorboard}#hparams" "$out/tensorboard-hparams.png"
ray=$(awk '/^Ray dashboard:  http/ {print $3}' "$log")
if [[ -n "$ray" ]]; then shoot "$ray" "$out/ray-dashboard.png"; fi
