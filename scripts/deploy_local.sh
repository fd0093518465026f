#!/usr/bin/env bash
# deploy_local.sh -- the deployment of docs/deploy-coordinator.md and docs/deploy-site.md, played on
# one machine over loopback: a coordinator (SuperLink with TLS and SuperNode authentication) and
# NUM_SITES partner sites, each with its own key, data file, ledger and SuperNode, then one run.
#
# The command blocks of the two guides appear below verbatim (tests/deploy/test_deploy_docs.py
# checks that, and runs this script), so the guides cannot drift from what works.
#
# Usage:  scripts/deploy_local.sh [WORK_DIR]        (run inside the project's virtualenv)
# Env:    NUM_SITES=2   RUN_CONFIG='preset="digits" num-server-rounds=2 local-epochs=1' (TOML values: quote strings)
#         APP_SRC=<app folder, default: this repository>   KEEP=1 keeps WORK_DIR after success
# Exit:   0 when the run finished completed; non-zero otherwise (logs are printed).
# Nothing is left running: every process is started in its own process group and stopped on exit.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Use the project's virtualenv when there is one (Flower starts flwr-serverapp/flwr-clientapp by name).
[ -x "$REPO/.venv/bin/python" ] && case ":$PATH:" in *":$REPO/.venv/bin:"*) ;; *) PATH="$REPO/.venv/bin:$PATH";; esac
export PATH
WORK=$(realpath -m "${1:-$(mktemp -d -t privatune-deploy-XXXXXX)}")
NUM_SITES=${NUM_SITES:-2}
RUN_CONFIG_EXTRA=${RUN_CONFIG:-'preset="digits" num-server-rounds=2 local-epochs=1'}
APP_SRC=$(realpath "${APP_SRC:-$REPO}")
mkdir -p "$WORK/logs"
LOGS="$WORK/logs"
PIDFILE="$WORK/pids"
: > "$PIDFILE"
export PYTHONUNBUFFERED=1
SECONDS=0
LETTERS=(a b c d e f g h i j k l m n o p q r s t u v w x y z)

say() { printf '[deploy_local %4ss] %s\n' "$SECONDS" "$*"; }

free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }

# Start "$@" in the background in its own process group (setsid), output to $LOGS/<name>.log.
start_bg() {
  local name=$1; shift
  setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
  echo "$! $name" >> "$PIDFILE"
}

# wait_for_log NAME TEXT TIMEOUT_S: until TEXT is in the log; fail early if that process died.
wait_for_log() {
  local name=$1 text=$2 timeout=$3 pid
  pid=$(awk -v n="$name" '$2 == n {p=$1} END {print p}' "$PIDFILE")
  local deadline=$(( $(date +%s) + timeout ))
  until grep -qF -- "$text" "$LOGS/$name.log" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "deploy_local: $name exited before '$text'" >&2; return 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "deploy_local: no '$text' in $name.log after ${timeout}s" >&2; return 1
    fi
    sleep 0.2
  done
}

stop_all() {
  local code=$?
  trap - EXIT INT TERM
  # SuperNodes first (they deactivate at the link), then the SuperLink: SIGTERM, then SIGKILL.
  tac "$PIDFILE" 2>/dev/null | while read -r pid name; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    alive=0
    while read -r pid name; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done < "$PIDFILE"
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  while read -r pid name; do kill -KILL -- "-$pid" 2>/dev/null || true; done < "$PIDFILE"
  if [ "$code" != 0 ]; then
    for f in "$LOGS"/*.log; do echo "----- $f (tail)"; tail -n 40 "$f"; done >&2
    echo "deploy_local: FAILED (exit $code); everything is in $WORK" >&2
  elif [ "${KEEP:-0}" != 1 ]; then
    rm -rf "$WORK"
  fi
  exit "$code"
}
trap stop_all EXIT INT TERM

# Trial only: each site gets a slice of sklearn's digits as its own .npz (x: 8x8 images, y: labels).
write_trial_data() {
  python - "$1" "$2" "$3" <<'PY'
import sys
import numpy as np
from sklearn.datasets import load_digits
path, index, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
d = load_digits()
rows = np.array_split(np.random.default_rng(0).permutation(len(d.target)), count)[index]
np.savez(path, x=d.images[rows], y=d.target[rows])
PY
}

COORD_DIR="$WORK/coordinator"
SUPERLINK_HOST=127.0.0.1
SUPERLINK_PORT=$(free_port)
SUPERLINK_ADDRESS="$SUPERLINK_HOST:$SUPERLINK_PORT"
APP="$COORD_DIR/app"
mkdir -p "$COORD_DIR/incoming"
RUN_CONFIG="$RUN_CONFIG_EXTRA out-dir=\"$COORD_DIR/runs/trial\""
say "work dir $WORK, SuperLink $SUPERLINK_ADDRESS, $NUM_SITES sites"

# ------------------------------------------------------------ coordinator: certificates, SuperLink
(
  # doc: coordinator-env
  export FLWR_HOME="$COORD_DIR/flwr"
  export FLWR_TELEMETRY_ENABLED=0
  # doc: coordinator-pki
  privatune pki --out "$COORD_DIR/pki" --nodes 0
  # doc: coordinator-superlink
  start_bg superlink \
  flower-superlink \
      --ssl-ca-certfile "$COORD_DIR/pki/ca.crt" \
      --ssl-certfile "$COORD_DIR/pki/server.pem" \
      --ssl-keyfile "$COORD_DIR/pki/server.key" \
      --enable-supernode-auth \
      --host "$SUPERLINK_HOST" --port "$SUPERLINK_PORT" \
      --database "$COORD_DIR/superlink.db" \
      --disable-runtime-dependency-installation
  wait_for_log superlink "Uvicorn running on https://$SUPERLINK_ADDRESS" 180
  # doc: coordinator-cli-config
  mkdir -p "$FLWR_HOME"
  cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "privatune"

[superlink.privatune]
address = "$SUPERLINK_ADDRESS"
root-certificates = "$COORD_DIR/pki/ca.crt"
EOF
)
say "SuperLink up"
(
  cd "$APP_SRC"  # the checkout (or the app to deploy)
  # doc: coordinator-app
  privatune app-folder "$APP" --source .
)

# ------------------------------------------------------------ each site: key, data check, SuperNode
for i in $(seq 0 $((NUM_SITES - 1))); do
  SITE_ID="site-${LETTERS[$i]}"
  SITE_DIR="$WORK/$SITE_ID"
  mkdir -p "$SITE_DIR"
  write_trial_data "$SITE_DIR/data.npz" "$i" "$NUM_SITES"
  NODE_CONFIG="site-id=\"$SITE_ID\" data-path=\"$SITE_DIR/data.npz\" data-format=\"npz\" ledger-path=\"$SITE_DIR/ledger.sqlite\" max-epsilon=10.0 device=\"auto\""
  (
    # doc: site-env
    export FLWR_HOME="$SITE_DIR/flwr"
    export FLWR_TELEMETRY_ENABLED=0
    # doc: site-key
    python -m privatune.pki --node-key "$SITE_DIR/node-key"
  )
  # The site sends node-key.pub to the coordinator and receives ca.crt (not secret) in return.
  cp "$SITE_DIR/node-key.pub" "$COORD_DIR/incoming/$SITE_ID.pub"
  cp "$COORD_DIR/pki/ca.crt" "$SITE_DIR/ca.crt"
  (
    export FLWR_HOME="$COORD_DIR/flwr" FLWR_TELEMETRY_ENABLED=0
    # doc: coordinator-register
    flwr supernode register "$COORD_DIR/incoming/$SITE_ID.pub" --name "$SITE_ID"
  )
  (
    export FLWR_HOME="$SITE_DIR/flwr" FLWR_TELEMETRY_ENABLED=0
    # doc: site-check
    privatune site check --node-config "$NODE_CONFIG" --run-config "$RUN_CONFIG"
    # doc: site-budget
    privatune budget --node-config "$NODE_CONFIG"                            # what each dataset has spent
    privatune budget --node-config "$NODE_CONFIG" --run-config "$RUN_CONFIG" # ... and what this run would cost
    CLIENTAPP_PORT=$(free_port)
    # doc: site-supernode
    start_bg "supernode-$SITE_ID" \
    flower-supernode \
        --root-certificates "$SITE_DIR/ca.crt" \
        --auth-supernode-private-key "$SITE_DIR/node-key" \
        --superlink "$SUPERLINK_ADDRESS" \
        --port "$CLIENTAPP_PORT" \
        --node-config "$NODE_CONFIG"
  )
done
for i in $(seq 0 $((NUM_SITES - 1))); do
  SITE_ID="site-${LETTERS[$i]}"
  wait_for_log "supernode-$SITE_ID" "SuperNode ID:" 180
done
say "$NUM_SITES SuperNodes connected"

# ------------------------------------------------------------ coordinator: run
(
  export FLWR_HOME="$COORD_DIR/flwr" FLWR_TELEMETRY_ENABLED=0
  cd "$COORD_DIR"  # never inside an app folder: a bare `flwr` command migrates ./pyproject.toml
  # doc: coordinator-nodes
  flwr supernode list
  say "starting the run: $RUN_CONFIG"
  # doc: coordinator-run
  flwr run "$APP" --stream --run-config "$RUN_CONFIG"
  # doc: coordinator-status
  flwr ls
  flwr ls --format json > "$COORD_DIR/runs.json"
)
python - "$COORD_DIR/runs.json" <<'PY'
import json, sys
runs = json.load(open(sys.argv[1]))["runs"]
status = [r["status"] for r in runs]
print("deploy_local: run status", status)
sys.exit(0 if status and all(s == "finished:completed" for s in status) else 1)
PY
say "run completed; results in $COORD_DIR/runs/trial"
