#!/bin/sh
# make demo: start `kiln dev` (a single-node cluster with a local agent),
# build the examples on it end to end, print the outputs, and keep running
# until Ctrl-C.
set -eu
BIN=${BIN:-bin/kiln}
DATA=$(mktemp -d /tmp/kiln-demo-XXXXXX)
ADDR=${KILN_DEMO_ADDR:-127.0.0.1:8080}
SANDBOX_SH=""
if [ -x /bin/busybox ]; then SANDBOX_SH="--agent-nix-option sandbox-paths=/bin/sh=/bin/busybox"; fi
# shellcheck disable=SC2086
"$BIN" dev --data-dir "$DATA" --http-addr "$ADDR" --raft-addr 127.0.0.1:0 --log-level warn $SANDBOX_SH &
DEV=$!
trap 'kill $DEV 2>/dev/null; wait $DEV 2>/dev/null' EXIT INT TERM
i=0
until curl -sf "http://$ADDR/ready" >/dev/null 2>&1; do
  i=$((i+1)); [ $i -lt 100 ] || { echo "kiln dev did not become ready" >&2; exit 1; }
  sleep 0.2
done
echo "== building examples/default.nix on the local farm"
"$BIN" build -f examples/default.nix -A all --coordinator "http://$ADDR" --token-file "$DATA/admin-token"
echo "== done; kiln dev keeps running (Ctrl-C to stop). Data: $DATA"
wait $DEV
