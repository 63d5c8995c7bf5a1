#!/usr/bin/env bash
# Two builds side by side over HTTP: starts `OLD serve` and `NEW serve` (4 slots each), then
# alternates `chatstream bench --levels 1,4` between them ROUNDS times, printing each round's
# aggregate decode tokens/s at 1 and 4 streams and their ratio, then the medians of the
# rounds' ratios (new over old, and four over one). Servers that run in turn on one machine
# see the same phases of its speed, which a single run cannot tell apart from a change.
#
#   scripts/bench-ab.sh OLD_BINARY NEW_BINARY [ROUNDS] [more `chatstream bench` options]
#
# SERVE_ARGS (e.g. "--int8-activations") goes to both servers, OLD_ARGS and NEW_ARGS to one
# each (one binary twice, with and without an option: NEW_ARGS=--int8-activations B B).
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,11p "$0" >&2; exit 2; }
old=$1 new=$2 rounds=${3:-6}
shift $(($# < 3 ? $# : 3))
cd "$(dirname "$0")/.."
# shellcheck disable=SC2086 # SERVE_ARGS is a list of options
"$old" serve --concurrency 4 --port 8101 ${SERVE_ARGS:-} ${OLD_ARGS:-} >/tmp/bench-ab-old.log 2>&1 &
pids=$!
# shellcheck disable=SC2086
"$new" serve --concurrency 4 --port 8102 ${SERVE_ARGS:-} ${NEW_ARGS:-} >/tmp/bench-ab-new.log 2>&1 &
pids="$pids $!"
trap 'kill $pids 2>/dev/null' EXIT
for port in 8101 8102; do
  for _ in $(seq 100); do
    curl -sf "127.0.0.1:$port/ready" >/dev/null && break
    sleep 0.2
  done
done
for r in $(seq "$rounds"); do
  for side in old:8101 new:8102; do
    "$new" bench --url "127.0.0.1:${side#*:}" --levels 1,4 --decode-tokens 64 --rounds 3 "$@" |
      python3 -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin if l.startswith("{")]
one, four = (r["aggregate_decode_tokens_per_s"] for r in rows)
print(sys.argv[1], sys.argv[2], f"{one:.1f} {four:.1f} {four / one:.2f}")' "$r" "${side%%:*}"
  done
done | tee /tmp/bench-ab.txt
python3 - <<'PY'
from statistics import median
rows = [l.split() for l in open("/tmp/bench-ab.txt")]
by = {(r[0], r[1]): [float(v) for v in r[2:]] for r in rows}
rounds = sorted({r[0] for r in rows}, key=int)
new_over_old = [[by[r, "new"][i] / by[r, "old"][i] for r in rounds] for i in (0, 1)]
print(f"new over old, medians of the rounds: one stream {median(new_over_old[0]):.3f}, "
      f"four streams {median(new_over_old[1]):.3f}")
for side in ("old", "new"):
    print(f"{side}: four streams over one, median {median(by[r, side][2] for r in rounds):.2f}")
PY
