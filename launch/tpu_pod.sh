#!/usr/bin/env bash
# Runs a mim_jax config on every worker of a Cloud TPU VM slice (gcloud):
#   0. check that a gs:// WORKDIR can be written (before any slice is created);
#   1. create the slice NAME, or reuse it when it is READY (directly or through a queued
#      resource, optionally as Spot capacity); a preempted, suspended or failed one is deleted
#      and requested again;
#   2. on every worker: stop a previous mim_jax job and clear the libtpu lock, copy the
#      project's tracked files (or git clone --repo-url) and install them into a Python
#      PYTHON_VERSION virtual environment made with uv;
#   3. run `python -m mim_jax.main --config CONFIG --workdir WORKDIR --distributed [overrides]`
#      with that environment on all workers at once, each output line prefixed with its worker
#      number, kept in logs/tpu/NAME-TIME.log here and in ~/mim_jax_logs/ on each worker;
#   4. optionally delete the slice.
# --stop sends SIGTERM to the job on every worker (it saves a checkpoint and exits).
# See launch/README.md. Example:
#   launch/tpu_pod.sh --name mae-b16 --zone us-west4-a --accelerator-type v5litepod-16 \
#       --queued --spot configs/mae.py gs://BUCKET/runs/mae_b16 \
#       --config.data.data_dir=gs://BUCKET/tensorflow_datasets
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/tpu_pod.sh [options] CONFIG WORKDIR [--config.FIELD=VALUE ...]
       launch/tpu_pod.sh --stop [--delete] --name NAME --zone ZONE

WORKDIR: gs://BUCKET/path (passed to mim_jax.main unchanged; checked to be writable before
the slice is created), or a directory every worker sees at the same path (NFS, gcsfuse).
Options (each also read from the environment variable in brackets):
  --name NAME               TPU VM name [NAME]                                (default mim-jax)
  --zone ZONE               zone, e.g. us-central2-b [ZONE]                          (required)
  --accelerator-type TYPE   gcloud's name: v4-N, v5litepod-N (v5e), v5p-N, v6e-N; v5e-N is read
                            as v5litepod-N [ACCELERATOR_TYPE]  (required to create the slice)
  --runtime-version V       TPU software version [RUNTIME_VERSION]   (default: from TYPE)
  --project PROJECT         Google Cloud project [PROJECT]      (default: gcloud's setting)
  --spot                    create the slice as Spot (preemptible) capacity [SPOT=1]
  --queued                  create it through a queued resource, wait until ACTIVE [QUEUED=1]
  --repo-url URL            git clone URL on the workers instead of copying this checkout's
                            tracked files [REPO_URL]; --ref REF checks out REF [REPO_REF]
  --python-version V        Python of the workers' environment [PYTHON_VERSION] (default 3.12)
  --skip-install            keep the workers' code and environment as they are [SKIP_INSTALL=1]
  --no-bucket-check         do not test that a gs:// WORKDIR is writable [BUCKET_CHECK=0]
  --delete                  delete the slice (and its queued resource) at the end [DELETE=1]
  --stop                    send SIGTERM to the job on every worker, wait until it has exited
                            (at most STOP_TIMEOUT s), then stop (or delete, with --delete) [STOP=1]
  --dry-run                 print every command instead of running it [DRY_RUN=1]
  -h, --help                this message
LOG_DIR: where the local copy of the log goes (default logs/tpu in the repository).
Waits, in seconds: POLL_INTERVAL between state checks (30), READY_TIMEOUT in a transient slice
state (1800), QUEUE_TIMEOUT in the queue (0: no limit), STOP_TIMEOUT for the job to exit (300).
Arguments after WORKDIR (and everything after `--`) are passed on to mim_jax.main.
EOF
  exit "${1:-2}"
}

NAME=${NAME:-mim-jax}
ZONE=${ZONE:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
PROJECT=${PROJECT:-}
SPOT=${SPOT:-0}
QUEUED=${QUEUED:-0}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
SKIP_INSTALL=${SKIP_INSTALL:-0}
BUCKET_CHECK=${BUCKET_CHECK:-1}
DELETE=${DELETE:-0}
STOP=${STOP:-0}
DRY_RUN=${DRY_RUN:-0}
POLL_INTERVAL=${POLL_INTERVAL:-30}
READY_TIMEOUT=${READY_TIMEOUT:-1800}
QUEUE_TIMEOUT=${QUEUE_TIMEOUT:-0}
STOP_TIMEOUT=${STOP_TIMEOUT:-300}
LOG_DIR=${LOG_DIR:-}               # here; default: logs/tpu in the repository
REMOTE_DIR=${REMOTE_DIR:-mim_jax}  # on each worker, relative to the home directory

need_value() { if [ $# -lt 2 ] || [ -z "$2" ]; then echo "$0: $1 needs a value" >&2; usage; fi; }
positional=() forward=()
while [ $# -gt 0 ]; do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift ;;
    --zone) need_value "$@"; ZONE=$2; shift ;;
    --accelerator-type) need_value "$@"; ACCELERATOR_TYPE=$2; shift ;;
    --runtime-version) need_value "$@"; RUNTIME_VERSION=$2; shift ;;
    --project) need_value "$@"; PROJECT=$2; shift ;;
    --repo-url) need_value "$@"; REPO_URL=$2; shift ;;
    --ref) need_value "$@"; REPO_REF=$2; shift ;;
    --python-version) need_value "$@"; PYTHON_VERSION=$2; shift ;;
    --name=*|--zone=*|--accelerator-type=*|--runtime-version=*|--project=*|--repo-url=*|--ref=*|\
    --python-version=*)
      value=${1#*=}
      case ${1%%=*} in
        --name) NAME=$value ;; --zone) ZONE=$value ;; --accelerator-type) ACCELERATOR_TYPE=$value ;;
        --runtime-version) RUNTIME_VERSION=$value ;; --project) PROJECT=$value ;;
        --repo-url) REPO_URL=$value ;; --ref) REPO_REF=$value ;;
        --python-version) PYTHON_VERSION=$value ;;
      esac ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --no-bucket-check) BUCKET_CHECK=0 ;;
    --delete) DELETE=1 ;;
    --stop) STOP=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage 0 ;;
    --) shift; forward+=("$@"); break ;;
    *)
      if [ ${#positional[@]} -lt 2 ]; then
        case $1 in -*) echo "$0: unknown option $1" >&2; usage ;; esac
        positional+=("$1")
      else
        forward+=("$1")
      fi ;;
  esac
  shift
done
[ -n "$ZONE" ] || { echo "$0: set the zone (--zone or ZONE)" >&2; usage; }
if [ "$STOP" = 1 ]; then
  [ ${#positional[@]} -eq 0 ] || { echo "$0: --stop takes no CONFIG or WORKDIR" >&2; usage; }
  config="" workdir=""
else
  [ ${#positional[@]} -eq 2 ] || usage
  config=${positional[0]} workdir=${positional[1]}
fi

# Accelerator types by gcloud's names; v5e-N (the chip's marketing name) is v5litepod-N there.
case $ACCELERATOR_TYPE in
  v5e-*)
    echo "$0: note: gcloud calls $ACCELERATOR_TYPE v5litepod-${ACCELERATOR_TYPE#v5e-}; using that." >&2
    ACCELERATOR_TYPE=v5litepod-${ACCELERATOR_TYPE#v5e-} ;;
esac
if [ -n "$ACCELERATOR_TYPE" ] && ! [[ $ACCELERATOR_TYPE =~ ^(v2|v3|v4|v5litepod|v5p|v6e)-[0-9]+$ ]]; then
  echo "$0: unknown accelerator type '$ACCELERATOR_TYPE': use gcloud's names v4-N, v5litepod-N (v5e), v5p-N, v6e-N" >&2
  exit 2
fi
if [ -z "$RUNTIME_VERSION" ]; then
  case $ACCELERATOR_TYPE in
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;  # v4 and older
  esac
fi

for v in READY_TIMEOUT QUEUE_TIMEOUT STOP_TIMEOUT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "$0: $v must be a whole number of seconds" >&2; exit 2; }
done
[[ $POLL_INTERVAL =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "$0: POLL_INTERVAL must be seconds" >&2; exit 2; }

case $workdir in
  "") ;;
  gs://?*) ;;
  gs://*) echo "$0: WORKDIR '$workdir' names no bucket" >&2; exit 2 ;;
  /*) ;;
  *) echo "$0: warning: WORKDIR '$workdir' is relative: it resolves under ~/$REMOTE_DIR on each" \
       "worker's own disk, which only works on a single-host slice." >&2 ;;
esac

repo=$(cd "$(dirname "$0")/.." && pwd)
exec 3>&1  # query() prints to the real stdout from inside $(...)
run_id="$NAME-$(date +%Y%m%d-%H%M%S)"

# Words as one shell line: safe words as they are, others in single quotes.
quote() {
  local out="" a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=" $a"
    else out+=" '${a//\'/\'\\\'\'}'"; fi
  done
  printf '%s' "${out# }"
}
# A command as one copy-pasteable line.
show() { printf '+ %s\n' "$(quote "$@")"; }
# Runs a command, or only prints it under --dry-run.
run() {
  show "$@"
  [ "$DRY_RUN" = 1 ] || "$@"
}
# A query whose answer decides what to do next; under --dry-run it is printed and answers
# nothing (as if the resource did not exist).
query() {
  if [ "$DRY_RUN" = 1 ]; then show "$@" >&3; return 0; fi
  "$@" 2>/dev/null || true
}
fail() { echo "$0: $1" >&2; exit 1; }

project_flag=()
[ -z "$PROJECT" ] || project_flag=(--project "$PROJECT")
tpu=(gcloud compute tpus tpu-vm)
qr=(gcloud compute tpus queued-resources)
where=(--zone "$ZONE" "${project_flag[@]}")
spot_flag=()
[ "$SPOT" != 1 ] || spot_flag=(--spot)

# --- Commands run on every worker -----------------------------------------------------------
# The worker's number, from the metadata server (as jax.distributed reads it).
# shellcheck disable=SC2016  # expanded by the workers' shell
worker_id='$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'
# The job's processes: a python started with `-m mim_jax.main`. The pattern is anchored at the
# start of the command line, so the shell that runs these commands (whose command line names
# mim_jax.main too) never matches it.
job_pattern='^[^ ]*python[0-9.]* -m mim_jax[.]main( |$)'
libtpu_lock=/tmp/libtpu_lockfile
# Sends SIGTERM to the job and waits (at most STOP_TIMEOUT s) until it has exited. $1 = kill:
# then SIGKILL what is left and remove the libtpu lock (before a launch); otherwise report it
# and fail.
stop_command() {
  local left
  if [ "${1:-}" = kill ]; then
    left="pkill -KILL -u \"\$u\" -f \"\$p\"; sleep 1; echo \"[worker \$w] mim_jax still running after $STOP_TIMEOUT s: killed\""
  else
    left="echo \"[worker \$w] mim_jax still running $STOP_TIMEOUT s after SIGTERM\"; exit 1"
  fi
  local cmd="w=$worker_id; p='$job_pattern'; u=\$(id -u); if pgrep -u \"\$u\" -f \"\$p\" >/dev/null; then pkill -TERM -u \"\$u\" -f \"\$p\" || true; echo \"[worker \$w] SIGTERM sent to mim_jax\"; t=0; while pgrep -u \"\$u\" -f \"\$p\" >/dev/null && [ \"\$t\" -lt $STOP_TIMEOUT ]; do sleep 1; t=\$((t + 1)); done; if pgrep -u \"\$u\" -f \"\$p\" >/dev/null; then $left; else echo \"[worker \$w] mim_jax exited\"; fi; else echo \"[worker \$w] no mim_jax job running\"; fi"
  if [ "${1:-}" = kill ]; then
    cmd+="; rm -f $libtpu_lock 2>/dev/null || sudo -n rm -f $libtpu_lock 2>/dev/null || true"
  fi
  printf '%s' "$cmd"
}
stop_job() { run "${tpu[@]}" ssh "$NAME" "${where[@]}" --worker=all --command "$(stop_command)"; }

# --- The slice's lifecycle ------------------------------------------------------------------
owner=node          # what holds the slice: its queued resource (qr) or the TPU VM itself (node)
[ "$QUEUED" != 1 ] || owner=qr
phase=start         # start -> slice (acquiring) -> ready -> train
created=0           # 1 once this run asked for the slice (it deletes it if it stops before READY)
deleted=0           # 1 once this run deleted a queued resource to request it again
signalled=""        # INT or TERM, when one stopped this script
pkg="" sleeper="" train_pid=""

delete_slice() {
  if [ "$owner" = qr ]; then
    run "${qr[@]}" delete "$NAME" "${where[@]}" --force --quiet
  else
    run "${tpu[@]}" delete "$NAME" "${where[@]}" --quiet
  fi
}

# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
  local rc=$?
  trap - EXIT
  [ -z "$sleeper" ] || kill "$sleeper" 2>/dev/null || true
  [ -z "$pkg" ] || [ "$DRY_RUN" = 1 ] || rm -f "$pkg"
  if [ -n "$signalled" ] && [ "$phase" = train ]; then
    echo "Stopping mim_jax on every worker of $NAME (SIGTERM: it saves a checkpoint) ..." >&2
    if stop_job; then
      wait "$train_pid" 2>/dev/null || true
    else
      kill "$train_pid" 2>/dev/null || true
    fi
  fi
  if [ "$phase" = slice ] && [ "$rc" != 0 ]; then
    if [ "$created" = 1 ]; then
      echo "Deleting $NAME: this run requested it and stopped before it was READY." >&2
      delete_slice || true
    elif [ "$owner" = qr ] && [ "$DELETE" != 1 ]; then
      echo "Queued resource $NAME (not created by this run) stays; delete it with:" \
        "$(quote "${qr[@]}" delete "$NAME" "${where[@]}" --force)" >&2
    fi
  fi
  if [ "$DELETE" = 1 ] && { [ "$phase" != slice ] || [ "$created" = 0 ]; } && [ "$phase" != start ]; then
    delete_slice || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'signalled=INT; exit 130' INT
trap 'signalled=TERM; exit 143' TERM

# Sleeps POLL_INTERVAL seconds; a signal interrupts it at once.
nap() {
  sleep "$POLL_INTERVAL" &
  sleeper=$!
  wait "$sleeper" || true
  sleeper=""
}
# Waits one poll in a state: prints each new state once; fails after LIMIT seconds (0: no limit)
# in states of the same KIND.
wait_kind="" wait_text="" wait_since=0
wait_in() {  # KIND LIMIT_VARIABLE TEXT
  local limit=${!2}
  if [ "$1" != "$wait_kind" ]; then wait_kind=$1 wait_since=$SECONDS; fi
  if [ "$3" != "$wait_text" ]; then wait_text=$3; echo "Waiting: $3 ..." >&2; fi
  if [ "$limit" -gt 0 ] && [ $((SECONDS - wait_since)) -ge "$limit" ]; then
    fail "gave up after $limit s ($2): $3"
  fi
  nap
}

qr_state() { query "${qr[@]}" describe "$NAME" "${where[@]}" --format='value(state.state)'; }
node_state() { query "${tpu[@]}" describe "$NAME" "${where[@]}" --format='value(state)'; }
need_type() {
  [ -n "$ACCELERATOR_TYPE" ] || { echo "$0: TPU $NAME does not exist: set --accelerator-type" >&2
                                  exit 2; }
}
create_slice() {
  need_type
  created=1  # before the call: an interrupt during it deletes what it may have made
  if [ "$owner" = qr ]; then
    run "${qr[@]}" create "$NAME" --node-id "$NAME" "${where[@]}" \
      --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$RUNTIME_VERSION" "${spot_flag[@]}"
  else
    run "${tpu[@]}" create "$NAME" "${where[@]}" --accelerator-type "$ACCELERATOR_TYPE" \
      --version "$RUNTIME_VERSION" "${spot_flag[@]}"
  fi
}

# Until the slice is READY: reuses a READY one, waits through transient states, deletes and
# requests again what was preempted, suspended or failed, and fails in one line otherwise.
acquire_slice() {
  local s n
  if [ "$DRY_RUN" = 1 ]; then
    if [ "$owner" = qr ]; then qr_state; else node_state; fi
    create_slice
    return
  fi
  while :; do
    if [ "$owner" = qr ]; then
      s=$(qr_state)
      case $s in
        ACTIVE) ;;  # the TPU VM is checked below
        "")
          if [ "$created" = 1 ]; then
            wait_in queue QUEUE_TIMEOUT "queued resource $NAME is being created"; continue
          fi
          n=$(node_state)
          if [ -z "$n" ]; then create_slice; continue; fi
          if [ "$deleted" = 0 ]; then
            echo "TPU $NAME exists without a queued resource: handling the TPU VM itself." >&2
            owner=node; continue
          fi
          wait_in gone READY_TIMEOUT "TPU $NAME is $n"; continue ;;
        CREATING|ACCEPTED|WAITING_FOR_RESOURCES|PROVISIONING)
          wait_in queue QUEUE_TIMEOUT "queued resource $NAME is $s"; continue ;;
        SUSPENDED|FAILED)
          [ "$created" = 0 ] || fail "queued resource $NAME became $s (why: $(quote "${qr[@]}" describe "$NAME" "${where[@]}")); run the same command again to request it again"
          echo "Queued resource $NAME is $s: deleting it and requesting it again." >&2
          delete_slice; deleted=1; continue ;;
        SUSPENDING|DELETING)
          wait_in gone READY_TIMEOUT "queued resource $NAME is $s"; continue ;;
        *) fail "queued resource $NAME is $s, a state this script does not handle" ;;
      esac
    fi
    n=$(node_state)
    case $n in
      READY)
        [ "$created" = 1 ] || echo "Reusing TPU $NAME (READY)." >&2
        return ;;
      PREEMPTED|TERMINATED)
        [ "$created" = 0 ] || fail "TPU $NAME became $n; run the same command again to create it again"
        echo "TPU $NAME is $n: deleting it to create it again." >&2
        delete_slice
        [ "$owner" != qr ] || deleted=1
        continue ;;
      "")
        if [ "$owner" = qr ]; then
          wait_in ready READY_TIMEOUT "queued resource $NAME is ACTIVE, its TPU VM not yet"
        elif [ "$created" = 0 ]; then
          create_slice
        else
          fail "TPU $NAME is gone after its creation"
        fi
        continue ;;
      CREATING|STARTING|RESTARTING|REIMAGING|REPAIRING|DELETING)
        wait_in ready READY_TIMEOUT "TPU $NAME is $n"; continue ;;
      *)
        fail "TPU $NAME is $n: start it (gcloud compute tpus tpu-vm start) or delete it, then run again" ;;
    esac
  done
}

# --- --stop -----------------------------------------------------------------------------------
if [ "$STOP" = 1 ]; then
  phase=ready
  # --delete must know whether a queued resource holds the slice.
  if [ "$DELETE" = 1 ] && [ "$owner" = node ] && [ -n "$(qr_state)" ]; then owner=qr; fi
  echo "Stopping mim_jax on every worker of $NAME (SIGTERM: it saves a checkpoint) ..." >&2
  stop_job
  exit 0
fi

# --- 0. A gs:// WORKDIR must be writable, before any slice is made --------------------------
if [[ $workdir == gs://* ]] && [ "$BUCKET_CHECK" = 1 ]; then
  probe="${workdir%/}/.mim_jax_write_check-$run_id"
  if [ "$DRY_RUN" = 1 ]; then
    show gcloud storage cp EMPTY_FILE "$probe"
    show gcloud storage rm "$probe"
  else
    empty=$(mktemp)
    if ! err=$(gcloud storage cp "$empty" "$probe" "${project_flag[@]}" 2>&1 >/dev/null); then
      rm -f "$empty"
      err=$(printf '%s\n' "$err" | grep -m 1 ERROR || printf '%s\n' "$err" | grep . | tail -n 1 || true)
      fail "cannot write to $workdir (no such bucket, or no permission): ${err:-gcloud storage cp failed}"
    fi
    rm -f "$empty"
    gcloud storage rm "$probe" "${project_flag[@]}" >/dev/null 2>&1 || true
  fi
fi

# Copying this checkout needs git to list its tracked files: checked before the slice is made.
if [ "$SKIP_INSTALL" != 1 ] && [ -z "$REPO_URL" ] && [ "$DRY_RUN" != 1 ]; then
  git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1 \
    || fail "$repo is not a git checkout: use --repo-url URL (or --skip-install)"
fi

# --- 1. The slice ---------------------------------------------------------------------------
phase=slice
acquire_slice
phase=ready

# --- 2. Clear and install on every worker ---------------------------------------------------
# A previous job (its ssh session lost, or started by hand) would hold the TPUs: SIGTERM (it
# checkpoints), SIGKILL after STOP_TIMEOUT s, then the libtpu lock file is removed.
run "${tpu[@]}" ssh "$NAME" "${where[@]}" --worker=all --command "$(stop_command kill)"

# shellcheck disable=SC2088  # expanded by the workers' shell
venv="~/$REMOTE_DIR/.venv"
# uv (from PyPI with the image's pip, else its installer) makes a Python PYTHON_VERSION
# environment, downloading that Python where the image has none; the project goes in with its
# TPU extra.
install="export PATH=\"\$HOME/.local/bin:\$PATH\" && { command -v uv >/dev/null || PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user 'uv>=0.5' || curl -LsSf https://astral.sh/uv/install.sh | sh; } && cd ~/$REMOTE_DIR && rm -rf .venv && uv venv -q --python $(quote "$PYTHON_VERSION") .venv && uv pip install -q --python .venv/bin/python -e '.[tpu]' && .venv/bin/python -c 'import sys, jax, mim_jax; print(\"python\", sys.version.split()[0], \"jax\", jax.__version__)'"
if [ "$SKIP_INSTALL" = 1 ]; then
  :
elif [ -n "$REPO_URL" ]; then
  checkout=""
  [ -z "$REPO_REF" ] || checkout=" && (cd ~/$REMOTE_DIR && git checkout -q $(quote "$REPO_REF"))"
  run "${tpu[@]}" ssh "$NAME" "${where[@]}" --worker=all --command \
    "set -e; rm -rf ~/$REMOTE_DIR && git clone -q $(quote "$REPO_URL") ~/$REMOTE_DIR$checkout && $install"
else
  # The files git tracks, as they are in this working tree (uncommitted edits included;
  # untracked files, runs, logs and caches left out).
  pkg=$(mktemp -u "${TMPDIR:-/tmp}/mim_jax.XXXXXX").tgz
  printf '+ (cd %s && git ls-files -z | tar czf %s --null -T -)\n' "$(quote "$repo")" "$(quote "$pkg")"
  if [ "$DRY_RUN" != 1 ]; then
    (cd "$repo" && git ls-files -z | while IFS= read -r -d '' f; do
       if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
     done | tar czf "$pkg" --null -T -)
  fi
  run "${tpu[@]}" scp "$pkg" "$NAME:~/mim_jax.tgz" "${where[@]}" --worker=all
  run "${tpu[@]}" ssh "$NAME" "${where[@]}" --worker=all --command \
    "set -e; rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar xzf ~/mim_jax.tgz -C ~/$REMOTE_DIR && $install"
fi

# --- 3. Train on every worker ----------------------------------------------------------------
# The job runs detached from the ssh session (nohup, output to ~/mim_jax_logs/RUN_ID.log), so a
# lost connection does not stop it; the session streams that log back, each line prefixed with
# "[worker N]", and ends with the job's exit status.
train=$(quote -m mim_jax.main --config "$config" --workdir "$workdir" --distributed "${forward[@]}")
remote="cd ~/$REMOTE_DIR || exit 1; export TF_CPP_MIN_LOG_LEVEL=2; w=$worker_id; mkdir -p ~/mim_jax_logs; log=~/mim_jax_logs/$run_id.log; : > \"\$log\"; nohup $venv/bin/python $train >> \"\$log\" 2>&1 < /dev/null & pid=\$!; tail -n +1 --pid=\"\$pid\" -f \"\$log\" | sed -u \"s/^/[worker \$w] /\" & wait \"\$pid\"; rc=\$?; wait; exit \"\$rc\""
log="${LOG_DIR:-$repo/logs/tpu}/$run_id.log"
if [ "$DRY_RUN" = 1 ]; then
  show "${tpu[@]}" ssh "$NAME" "${where[@]}" --worker=all --command "$remote"
  echo "# output of all workers would go to $log" >&2
  exit 0
fi
mkdir -p "$(dirname "$log")"
echo "Training on every worker of $NAME; log: $log (Ctrl-C stops the job with a checkpoint)" >&2
show "${tpu[@]}" ssh "$NAME" "${where[@]}" --worker=all --command "$remote"
phase=train
"${tpu[@]}" ssh "$NAME" "${where[@]}" --worker=all --command "$remote" > >(tee -a "$log") 2>&1 &
train_pid=$!
status=0
wait "$train_pid" || status=$?
phase=ready
echo "mim_jax on $NAME finished with status $status (log: $log)." >&2
exit "$status"
