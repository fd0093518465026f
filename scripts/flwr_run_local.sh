#!/usr/bin/env bash
# flwr_run_local.sh -- `flwr run .` as a LOCAL SIMULATION of privatune: the real ServerApp and
# ClientApp of pyproject.toml, run by Flower's simulation runtime behind a SuperLink that this
# script starts and stops itself.
#
# Why not a bare `flwr run .`: in flwr 1.42 its default `local` connection starts a *detached*
# `flower-superlink --simulation` on 127.0.0.1:39091 that outlives the run, and that SuperLink
# re-installs [project].dependencies with `uv sync` for every run (an unpinned torch becomes
# torch 2.15 + CUDA wheels, gigabytes). Here the SuperLink runs with
# --disable-runtime-dependency-installation (the apps use this virtualenv), on a free loopback
# port, with FLWR_HOME and Ray's temp folder in a private work folder, and nothing outlives the script.
#
# Usage:  scripts/flwr_run_local.sh OUT_DIR ['k=v k2="text" ...' | overrides.toml]
#         (inside the project's virtualenv; the second argument overrides [tool.flwr.app.config],
#          TOML values: quote strings; OUT_DIR becomes the run config's out-dir)
# Env:    NUM_SUPERNODES=3     simulated clients (one SuperNode each)
#         CPUS_PER_CLIENT=1    CPU cores Ray reserves per ClientApp (clients run in parallel up to cores/this)
#         CLIENT_GPUS=0        GPU share per ClientApp (e.g. 0.5); 0 on a machine without a GPU
#         RUN_TIMEOUT=3600     seconds before the run is abandoned
#         APP_DIR=<this repo>  the Flower app to run        KEEP_WORK=1 keeps the work folder (Ray logs)
# Output: everything of the run in OUT_DIR (summary.json, metrics.jsonl, ...), the logs in
#         OUT_DIR/flwr-logs/{superlink.log,run.log}. Exit 0 only when the run finished completed.
set -euo pipefail

PROG=flwr_run_local.sh
say() { printf '[%s %4ss] %s\n' "$PROG" "$SECONDS" "$*"; }
die() { printf '%s: %s\n' "$PROG" "$*" >&2; exit 2; }        # bad input, nothing ran
fail() { printf '%s: %s\n' "$PROG" "$*" >&2; exit 1; }       # the run did not complete

if [ $# -lt 1 ] || [ $# -gt 2 ] || [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
  sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Use the project's virtualenv when there is one (Flower starts flwr-serverapp/flwr-clientapp by name).
[ -x "$REPO/.venv/bin/python" ] && case ":$PATH:" in *":$REPO/.venv/bin:"*) ;; *) PATH="$REPO/.venv/bin:$PATH";; esac
export PATH
# Become a child subreaper (Linux prctl; kept across exec, same PID): any process this run starts
# that loses its parent (Ray daemons, a SuperExec) is re-parented to this script instead of init,
# so the teardown can find every one of them by walking the process tree down from here.
if [ "${_PRIVATUNE_SUBREAPER:-}" != "$$" ]; then
  export _PRIVATUNE_SUBREAPER=$$
  exec python -c '
import ctypes, os, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
except (AttributeError, OSError):
    pass  # not Linux: the marker sweep alone does the teardown
os.execv("/bin/bash", ["/bin/bash", *sys.argv[1:]])
' "${BASH_SOURCE[0]}" "$@"
fi
unset _PRIVATUNE_SUBREAPER
APP_DIR=$(realpath "${APP_DIR:-$REPO}")
OUT_DIR=$(realpath -m "$1")
EXTRA_CONFIG=${2:-}
NUM_SUPERNODES=${NUM_SUPERNODES:-3}
CPUS_PER_CLIENT=${CPUS_PER_CLIENT:-1}
CLIENT_GPUS=${CLIENT_GPUS:-0}
RUN_TIMEOUT=${RUN_TIMEOUT:-3600}
CONNECTION=privatune-local-sim

[[ $NUM_SUPERNODES =~ ^[1-9][0-9]*$ ]] || die "NUM_SUPERNODES must be a positive integer, got '$NUM_SUPERNODES'"
[[ $CPUS_PER_CLIENT =~ ^[1-9][0-9]*$ ]] || die "CPUS_PER_CLIENT must be a positive integer, got '$CPUS_PER_CLIENT'"
[[ $CLIENT_GPUS =~ ^[0-9]*\.?[0-9]+$ ]] || die "CLIENT_GPUS must be a number >= 0, got '$CLIENT_GPUS'"
[[ $RUN_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "RUN_TIMEOUT must be a positive number of seconds, got '$RUN_TIMEOUT'"
for tool in python flwr flower-superlink; do
  command -v "$tool" >/dev/null || die "'$tool' not found: activate the project's virtualenv (. .venv/bin/activate)"
done
[ -f "$APP_DIR/pyproject.toml" ] || die "$APP_DIR is not a Flower app: no pyproject.toml"
if grep -Eq '^[[:space:]]*\[+[[:space:]]*tool\.flwr\.federations' "$APP_DIR/pyproject.toml"; then
  die "$APP_DIR/pyproject.toml still has a [tool.flwr.federations] table: flwr 1.42 would rewrite the file; remove the table"
fi
if [ -e "$OUT_DIR/summary.json" ]; then
  die "$OUT_DIR already holds a run (summary.json): choose a new OUT_DIR or delete that one"
fi

# ---------------------------------------------------------------- checks before anything starts
# The same checks and fill-ins as `privatune simulate` (simulations.simulate.prepare_config): the
# config is valid, the dataset can feed NUM_SUPERNODES clients, min-clients <= clients, HE keys.
# Prints the --run-config string for flwr (user overrides + out-dir + what prepare_config filled in).
RUN_CONFIG=$(cd "$APP_DIR" && PYTHONPATH="$APP_DIR${PYTHONPATH:+:$PYTHONPATH}" \
  python - "$APP_DIR" "$OUT_DIR" "$NUM_SUPERNODES" "$EXTRA_CONFIG" "$CLIENT_GPUS" <<'PY'
import sys
import tomllib
from pathlib import Path

import click
from flwr.common.config import parse_config_args

from common.config import RunConfig
from simulations.simulate import prepare_config

app, out, clients, extra = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
client_gpus = float(sys.argv[5])


def fail(msg: str) -> None:
    print(f"flwr_run_local.sh: bad run config: {msg}", file=sys.stderr)
    sys.exit(2)


def toml_value(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if '"' not in text and "\\" not in text:
        return f'"{text}"'
    if "'" not in text:
        return f"'{text}'"
    fail(f"{key}: a value may not hold both quote kinds: {text!r}")
    return ""


defaults = tomllib.loads((app / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
try:
    overrides = parse_config_args([extra]) if extra.strip() else {}
except (click.ClickException, ValueError, OSError) as err:
    fail(getattr(err, "message", None) or str(err))
unknown = sorted(set(overrides) - set(defaults))
if unknown:
    fail(f"unknown key(s) {unknown}; the keys are those of [tool.flwr.app.config] in {app / 'pyproject.toml'}")
if "out-dir" in overrides:
    fail("give the output folder as the first argument (OUT_DIR), not as out-dir")
try:
    cfg = RunConfig.from_flower({**defaults, **overrides})
    ready = prepare_config(cfg, clients, out)
except ValueError as err:
    fail(str(err))
if client_gpus > 0:
    import torch

    if not torch.cuda.is_available():
        fail("CLIENT_GPUS > 0 but torch sees no CUDA GPU here: Ray would start no ClientApp and the run would fail")
final = dict(overrides)
final["out-dir"] = ready.out_dir
if ready.min_clients != cfg.min_clients:
    final["min-clients"] = ready.min_clients
if ready.he_public_context != cfg.he_public_context:
    final["he-public-context"] = ready.he_public_context
print(" ".join(f"{k}={toml_value(k, v)}" for k, v in final.items()))
PY
)
RUN_CONFIG=$(tail -n 1 <<<"$RUN_CONFIG")  # the last line is the config; anything above it is chatter

# ---------------------------------------------------------------- private work folder, environment
# /tmp, short: Ray's Unix sockets live under RAY_TMPDIR and their paths must stay under 107 bytes.
WORK=$(mktemp -d /tmp/ptfr-XXXXXX)
LOGS="$OUT_DIR/flwr-logs"
SL_LOG="$LOGS/superlink.log"
RUN_LOG="$LOGS/run.log"
mkdir -p "$LOGS" "$WORK/flwr-home" "$WORK/ray" "$WORK/mpl"
MARK_VAR=PRIVATUNE_FLWR_RUN_LOCAL
MARK="$$-$(date +%s%N)-$RANDOM"
export "$MARK_VAR=$MARK"  # every process started below inherits it: the teardown finds them all by it
export FLWR_HOME="$WORK/flwr-home" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export RAY_TMPDIR="$WORK/ray" RAY_DEDUP_LOGS=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
export MPLCONFIGDIR="$WORK/mpl" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
SL_PID=""
CLI_PID=""

# Live processes carrying this invocation's marker (this shell's own environment does not: only
# the programs it starts get the exported variable). One grep over all of /proc: a loop would take
# seconds on a busy 2-core machine.
marked_pids() {
  local file
  # grep runs without the marker (env -u), or it would find itself.
  for file in $(env -u "$MARK_VAR" grep -lxzF -- "$MARK_VAR=$MARK" /proc/[0-9]*/environ 2>/dev/null); do
    file=${file#/proc/}
    echo "${file%/environ}"
  done
  return 0
}

# Live descendants of this script (zombies excluded), by walking /proc once with builtins only.
# As a subreaper, the script is an ancestor of everything the run started, whatever re-parenting
# or environment rewriting happened (Ray's DashboardAgent overwrites its environment with its title).
# The subshells and tools of this very query (the child of $$ above $BASHPID) are left out.
descendant_pids() {
  local file line rest pid ppid state helper=$BASHPID
  local -A parent=()
  for file in /proc/[0-9]*/stat; do
    read -r line <"$file" 2>/dev/null || continue
    rest=${line##*) }
    pid=${file#/proc/}
    pid=${pid%/stat}
    read -r state ppid _ <<<"$rest"
    [ "$state" = Z ] || [ "$state" = X ] || parent[$pid]=$ppid
  done
  while [ -n "${parent[$helper]:-}" ] && [ "${parent[$helper]}" != "$$" ]; do
    helper=${parent[$helper]}
  done
  local -A inside=([$$]=1)
  local grew=1
  while [ "$grew" = 1 ]; do
    grew=0
    for pid in "${!parent[@]}"; do
      if [ "$pid" != "$helper" ] && [ -z "${inside[$pid]:-}" ] && [ -n "${inside[${parent[$pid]}]:-}" ]; then
        inside[$pid]=1
        grew=1
        echo "$pid"
      fi
    done
  done
  return 0
}

# Everything of this run still alive: by marker, and by descent from this script.
# (Builtins only: a tool started here would carry the marker and count as left over.)
run_pids() {
  local pid
  local -A all=()
  for pid in $(marked_pids) $(descendant_pids); do
    all[$pid]=1
  done
  echo "${!all[@]}"
}

stop_all() {
  # The CLI and the SuperLink's group first (SIGTERM: the SuperLink also stops its SuperExec);
  # then everything of the run still alive (run_pids: by marker and by descent; flwr-simulation and Ray
  # live in other sessions):
  # SIGTERM after 3 s, SIGKILL after 8 s, give up after 15 s.
  [ -n "$CLI_PID" ] && kill -TERM "$CLI_PID" 2>/dev/null
  local before
  before=$(run_pids)
  [ -n "$SL_PID" ] && kill -TERM -- "-$SL_PID" 2>/dev/null
  local left start=$SECONDS termed=0 quiet=0 seen="$before"
  # Done only after two empty sweeps 1 s apart: Ray can still fork a worker while its parent dies.
  while [ "$quiet" -lt 2 ]; do
    left=$(run_pids)
    seen="$seen $left"
    if [ -z "$left" ]; then
      quiet=$((quiet + 1))
      sleep 1
      continue
    fi
    quiet=0
    if [ $((SECONDS - start)) -ge 15 ]; then
      echo "$PROG: processes still alive after teardown: $(echo $left)" >&2
      return 1
    elif [ $((SECONDS - start)) -ge 8 ]; then
      kill -KILL $left 2>/dev/null
    elif [ $((SECONDS - start)) -ge 3 ] && [ "$termed" = 0 ]; then
      kill -TERM $left 2>/dev/null
      termed=1
    fi
    sleep 0.2
  done
  # Ray's DashboardAgent rewrites its process title over its environment, so a later sweep can miss
  # it: every process seen during teardown that is still alive now is killed outright.
  for pid in $seen; do
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  done
  return 0
}

cleanup() {
  local code=$?
  trap - EXIT INT TERM HUP
  set +e
  stop_all || code=1
  if [ "${KEEP_WORK:-0}" = 1 ]; then
    echo "$PROG: work folder kept: $WORK (FLWR_HOME, Ray session logs)" >&2
  else
    rm -rf "$WORK"
  fi
  if [ "$code" != 0 ]; then
    echo "----- $SL_LOG (last 30 lines)" >&2; tail -n 30 "$SL_LOG" >&2 2>/dev/null
    echo "$PROG: FAILED (exit $code); logs in $LOGS" >&2
  fi
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }

# GET /health answers 200 once the SuperLink serves (plain bash: no curl needed).
health_ok() {
  local status=""
  { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 1
  printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
  read -r -t 5 _ status _ <&3 || true
  exec 3<&-
  [ "$status" = 200 ]
}

# ---------------------------------------------------------------- SuperLink (simulation runtime)
# Own session (setsid) so that Ctrl-C reaches this script, which then stops it in order.
start_superlink() {
  PORT=$(free_port)
  : > "$SL_LOG"
  (cd "$WORK" && exec setsid flower-superlink --simulation --insecure \
      --host 127.0.0.1 --port "$PORT" \
      --disable-runtime-dependency-installation) >>"$SL_LOG" 2>&1 </dev/null &
  SL_PID=$!
  local deadline=$((SECONDS + 120))
  until health_ok "$PORT"; do
    if ! kill -0 "$SL_PID" 2>/dev/null; then
      SL_PID=""
      return 1
    fi
    [ "$SECONDS" -ge "$deadline" ] && fail "SuperLink not ready after 120 s (log: $SL_LOG)"
    sleep 0.2
  done
}
for attempt in 1 2 3; do
  start_superlink && break
  # The port may have been taken between choosing it and binding it: try another one.
  [ "$attempt" = 3 ] && fail "SuperLink exited before it served (log: $SL_LOG)"
done
say "SuperLink (simulation) on 127.0.0.1:$PORT, FLWR_HOME=$FLWR_HOME"

cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "$CONNECTION"

[superlink.$CONNECTION]
address = "127.0.0.1:$PORT"
insecure = true
EOF

# ---------------------------------------------------------------- the run
FED_CONFIG="num-supernodes=$NUM_SUPERNODES client-resources-num-cpus=$CPUS_PER_CLIENT client-resources-num-gpus=$CLIENT_GPUS"
say "flwr run . $CONNECTION --stream --federation-config '$FED_CONFIG' --run-config '$RUN_CONFIG'"
(cd "$APP_DIR" && exec timeout --kill-after=30 "$RUN_TIMEOUT" \
    flwr run . "$CONNECTION" --stream --federation-config "$FED_CONFIG" --run-config "$RUN_CONFIG") \
    > >(tee "$RUN_LOG") 2>&1 </dev/null &
CLI_PID=$!
set +e
wait "$CLI_PID"
cli_code=$?
set -e
CLI_PID=""
[ "$cli_code" = 124 ] && fail "the run did not finish within RUN_TIMEOUT=$RUN_TIMEOUT s"
[ "$cli_code" = 0 ] || fail "flwr run exited with code $cli_code (log: $RUN_LOG)"

RUN_ID=$(sed -n 's/.*Successfully started run \([0-9][0-9]*\).*/\1/p' "$RUN_LOG" | head -n 1)
[ -n "$RUN_ID" ] || fail "no run id in $RUN_LOG"
STATUS=$(cd "$WORK" && flwr ls "$CONNECTION" --run-id "$RUN_ID" --format json \
  | python -c 'import json, sys; t = sys.stdin.read(); print(json.loads(t[t.index("{"):])["runs"][0]["status"])') \
  || fail "could not read the status of run $RUN_ID from the SuperLink"
[ "$STATUS" = "finished:completed" ] || fail "run $RUN_ID ended with status '$STATUS' (log: $RUN_LOG)"
[ -f "$OUT_DIR/summary.json" ] || fail "run $RUN_ID completed but wrote no $OUT_DIR/summary.json"

python - "$OUT_DIR/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
num = lambda v, d=4: f"{v:.{d}f}" if isinstance(v, (int, float)) else str(v)
eps = ", ".join(f"{k} {num(v, 3)}" for k, v in sorted((s.get("per_client_epsilon") or {}).items()))
print(f"rounds {s.get('rounds_completed')}, test accuracy {num(s.get('test_accuracy'))}, "
      f"macro-F1 {num(s.get('test_macro_f1'))}, target epsilon {s.get('target_epsilon')}; epsilon per client: {eps}")
PY
say "run $RUN_ID $STATUS; results in $OUT_DIR, logs in $LOGS"
