#!/usr/bin/env bash
# Load test for a running `mindroom-billing serve`: signed ~3.9 KB Stripe events (invoice.paid,
# minified) POSTed to /webhooks/stripe by wrk from a second process.
#
#   STRIPE_WEBHOOK_SECRET=whsec_load cargo run --release --bin mindroom-billing -- serve &
#   STRIPE_WEBHOOK_SECRET=whsec_load scripts/load.sh same       # one event id: the duplicate path
#   STRIPE_WEBHOOK_SECRET=whsec_load scripts/load.sh distinct   # a new event id per request
#
# Environment: URL (http://127.0.0.1:3005/webhooks/stripe), THREADS (2), CONNECTIONS (64),
# DURATION (20s), IDS (prepared distinct ids, 600000), SERVER_PID (to report RSS idle / peak),
# LOAD_DIR (/tmp/mindroom-load). Needs wrk and python3.
set -euo pipefail

MODE=${1:-same}
case "$MODE" in same|distinct) ;; *) echo "usage: $0 [same|distinct]" >&2; exit 2 ;; esac
URL=${URL:-http://127.0.0.1:3005/webhooks/stripe}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
DURATION=${DURATION:-20s}
export IDS=${IDS:-600000}
SECRET=${STRIPE_WEBHOOK_SECRET:?set STRIPE_WEBHOOK_SECRET to the server\'s secret}
SECRET=${SECRET%%,*}
export LOAD_DIR=${LOAD_DIR:-/tmp/mindroom-load}
export LOAD_MODE=$MODE
export LOAD_THREADS=$THREADS
ROOT=$(cd "$(dirname "$0")/.." && pwd)
command -v wrk >/dev/null || { echo "wrk not found (Debian: apt-get install wrk)" >&2; exit 1; }

mkdir -p "$LOAD_DIR"
# Sign with python3 (stdlib hmac): the timestamps must stay within the server's tolerance (300 s).
python3 - "$ROOT/testdata/stripe/events/2026-07-29.dahlia/invoice.paid.json" "$LOAD_DIR" "$SECRET" "$MODE" "$IDS" <<'PY'
import hashlib, hmac, json, sys, time
src, out, secret, mode, ids = sys.argv[1], sys.argv[2], sys.argv[3].encode(), sys.argv[4], int(sys.argv[5])
event = json.load(open(src))
event["id"] = "evt_LOADTEST_000000000000"
body = json.dumps(event, separators=(",", ":")).encode()
open(f"{out}/body.json", "wb").write(body)
t = str(int(time.time())).encode()
def sig(b):
    return hmac.new(secret, t + b"." + b, hashlib.sha256).hexdigest()
open(f"{out}/same.txt", "w").write(f"{t.decode()} {sig(body)}\n")
if mode == "distinct":
    at = body.index(b"000000000000")
    pre, post = body[:at], body[at + 12:]
    base = hmac.new(secret, t + b"." + pre, hashlib.sha256)
    with open(f"{out}/sigs.txt", "w") as f:
        run = f"{int(time.time()) % 10**6:06d}"
        for i in range(ids):
            suffix = f"{run}{i:06d}".encode()
            m = base.copy(); m.update(suffix + post)
            f.write(f"{suffix.decode()} {t.decode()} {m.hexdigest()}\n")
print(f"body {len(body)} bytes, mode {mode}" + (f", {ids} distinct ids" if mode == "distinct" else ""), file=sys.stderr)
PY

rss() { ps -o rss= -p "$1" 2>/dev/null | tr -d ' '; }
if [[ -n "${SERVER_PID:-}" ]]; then
  echo "server RSS before: $(rss "$SERVER_PID") KiB"
  peak_file=$(mktemp)
  ( peak=0; while kill -0 "$SERVER_PID" 2>/dev/null; do r=$(rss "$SERVER_PID"); [[ -n "$r" && "$r" -gt "$peak" ]] && peak=$r && echo "$peak" >"$peak_file"; sleep 0.5; done ) &
  sampler=$!
fi

wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$ROOT/benches/load/webhook.lua" "$URL"

if [[ -n "${SERVER_PID:-}" ]]; then
  kill "$sampler" 2>/dev/null || true
  echo "server RSS peak under load: $(cat "$peak_file") KiB; after: $(rss "$SERVER_PID") KiB"
  rm -f "$peak_file"
fi
