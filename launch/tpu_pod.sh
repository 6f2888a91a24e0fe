#!/usr/bin/env bash
# Runs a mim_jax config on every worker of a Cloud TPU VM slice (gcloud):
#   1. create the slice NAME, or reuse it if it exists (directly or through a queued resource,
#      optionally as Spot capacity);
#   2. install the project on every worker (copy this checkout, or git clone --repo-url) with
#      pip install -e ".[tpu]";
#   3. run `python3 -m mim_jax.main --config CONFIG --workdir WORKDIR --distributed [overrides]`
#      on all workers at once, each output line prefixed with its worker number, kept in
#      logs/tpu/NAME-TIME.log here and in ~/mim_jax_logs/ on each worker;
#   4. optionally delete the slice.
# See launch/README.md. Example:
#   launch/tpu_pod.sh --name mae-b16 --zone us-central2-b --accelerator-type v4-32 \
#       configs/mae.py /mnt/shared/runs/mae_b16 --config.data.data_dir=gs://BUCKET/tfds
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/tpu_pod.sh [options] CONFIG WORKDIR [--config.FIELD=VALUE ...]

WORKDIR must be shared storage that every worker sees at the same path (a gcsfuse or NFS mount).
Options (each also read from the environment variable in brackets):
  --name NAME               TPU VM name [NAME]                                (default mim-jax)
  --zone ZONE               zone, e.g. us-central2-b [ZONE]                          (required)
  --accelerator-type TYPE   e.g. v5litepod-16, v4-32, v5p-128 [ACCELERATOR_TYPE]
                            (required when the slice does not exist yet)
  --runtime-version V       TPU software version [RUNTIME_VERSION]   (default: from TYPE)
  --project PROJECT         Google Cloud project [PROJECT]      (default: gcloud's setting)
  --spot                    create the slice as Spot (preemptible) capacity [SPOT=1]
  --queued                  create it through a queued resource, wait until ACTIVE [QUEUED=1]
  --repo-url URL            git clone URL on the workers instead of copying this checkout
                            [REPO_URL]; --ref REF checks out REF [REPO_REF]
  --skip-install            the workers already have the project installed [SKIP_INSTALL=1]
  --delete                  delete the slice (and its queued resource) at the end [DELETE=1]
  --dry-run                 print every command instead of running it [DRY_RUN=1]
  -h, --help                this message
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
SKIP_INSTALL=${SKIP_INSTALL:-0}
DELETE=${DELETE:-0}
DRY_RUN=${DRY_RUN:-0}
REMOTE_DIR=${REMOTE_DIR:-mim_jax}  # on each worker, relative to the home directory

need_value() { [ $# -ge 2 ] && [ -n "$2" ] || { echo "$0: $1 needs a value" >&2; usage; }; }
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
    --name=*|--zone=*|--accelerator-type=*|--runtime-version=*|--project=*|--repo-url=*|--ref=*)
      value=${1#*=}
      case ${1%%=*} in
        --name) NAME=$value ;; --zone) ZONE=$value ;; --accelerator-type) ACCELERATOR_TYPE=$value ;;
        --runtime-version) RUNTIME_VERSION=$value ;; --project) PROJECT=$value ;;
        --repo-url) REPO_URL=$value ;; --ref) REPO_REF=$value ;;
      esac ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --delete) DELETE=1 ;;
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
[ ${#positional[@]} -eq 2 ] || usage
config=${positional[0]} workdir=${positional[1]}
[ -n "$ZONE" ] || { echo "$0: set the zone (--zone or ZONE)" >&2; usage; }

case $workdir in
  gs://*)
    echo "$0: WORKDIR must be a filesystem path: mim_jax writes it with ordinary file I/O." >&2
    echo "  Mount the bucket on every worker (Cloud Storage FUSE / gcsfuse, or Filestore/NFS)" >&2
    echo "  at the same path and pass that path." >&2
    exit 2 ;;
  /*) ;;
  *) echo "$0: warning: WORKDIR '$workdir' is relative: it resolves under ~/$REMOTE_DIR on each" \
       "worker's own disk, which only works on a single-host slice." >&2 ;;
esac

if [ -z "$RUNTIME_VERSION" ]; then
  case $ACCELERATOR_TYPE in
    v5litepod-*|v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi

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

project_flag=()
[ -z "$PROJECT" ] || project_flag=(--project "$PROJECT")
tpu=(gcloud compute tpus tpu-vm)
qr=(gcloud compute tpus queued-resources)
where=(--zone "$ZONE" "${project_flag[@]}")

# --- 1. The slice -------------------------------------------------------------------------
state=$(query "${tpu[@]}" describe "$NAME" "${where[@]}" --format='value(state)')
case $state in
  PREEMPTED|TERMINATED)
    echo "TPU $NAME is $state: deleting it to create it again." >&2
    if [ "$QUEUED" = 1 ]; then
      run "${qr[@]}" delete "$NAME" "${where[@]}" --force --quiet
    else
      run "${tpu[@]}" delete "$NAME" "${where[@]}" --quiet
    fi
    state="" ;;
esac
if [ -n "$state" ]; then
  echo "Reusing TPU $NAME ($state)." >&2
else
  [ -n "$ACCELERATOR_TYPE" ] || { echo "$0: TPU $NAME does not exist: set --accelerator-type" >&2
                                  usage; }
  spot_flag=()
  [ "$SPOT" != 1 ] || spot_flag=(--spot)
  if [ "$QUEUED" = 1 ]; then
    # The queued resource has the slice's name; an earlier request still waiting is reused.
    qstate=$(query "${qr[@]}" describe "$NAME" "${where[@]}" --format='value(state.state)')
    if [ -z "$qstate" ]; then
      run "${qr[@]}" create "$NAME" --node-id "$NAME" "${where[@]}" \
        --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$RUNTIME_VERSION" \
        "${spot_flag[@]}"
    fi
    echo "Waiting for queued resource $NAME to become ACTIVE ..." >&2
    while :; do
      qstate=$(query "${qr[@]}" describe "$NAME" "${where[@]}" --format='value(state.state)')
      [ "$DRY_RUN" != 1 ] || break
      case $qstate in
        ACTIVE) break ;;
        FAILED|SUSPENDED) echo "$0: queued resource $NAME is $qstate" >&2; exit 1 ;;
      esac
      sleep 60
    done
  else
    run "${tpu[@]}" create "$NAME" "${where[@]}" --accelerator-type "$ACCELERATOR_TYPE" \
      --version "$RUNTIME_VERSION" "${spot_flag[@]}"
  fi
fi

cleanup() {
  local rc=$?
  [ -z "${pkg:-}" ] || [ "$DRY_RUN" = 1 ] || rm -f "$pkg"
  if [ "$DELETE" = 1 ]; then
    if [ "$QUEUED" = 1 ]; then
      run "${qr[@]}" delete "$NAME" "${where[@]}" --force --quiet || true
    else
      run "${tpu[@]}" delete "$NAME" "${where[@]}" --quiet || true
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT

# --- 2. Install on every worker -------------------------------------------------------------
pip_install='python3 -m pip install -q -e ".[tpu]"'
if [ "$SKIP_INSTALL" = 1 ]; then
  :
elif [ -n "$REPO_URL" ]; then
  checkout=""
  [ -z "$REPO_REF" ] || checkout=" && git checkout -q $(quote "$REPO_REF")"
  run "${tpu[@]}" ssh "$NAME" "${where[@]}" --worker=all --command \
    "rm -rf ~/$REMOTE_DIR && git clone -q $(quote "$REPO_URL") ~/$REMOTE_DIR && cd ~/$REMOTE_DIR$checkout && $pip_install"
else
  # This checkout as it is (uncommitted changes included), without runs, logs and caches.
  pkg=$(mktemp -u "${TMPDIR:-/tmp}/mim_jax.XXXXXX").tgz
  run tar czf "$pkg" -C "$repo" --exclude=./.git --exclude=./runs --exclude=./logs \
    --exclude='./workdir*' --exclude='*.egg-info' --exclude=__pycache__ .
  run "${tpu[@]}" scp "$pkg" "$NAME:~/mim_jax.tgz" "${where[@]}" --worker=all
  run "${tpu[@]}" ssh "$NAME" "${where[@]}" --worker=all --command \
    "rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar xzf ~/mim_jax.tgz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR && $pip_install"
fi

# --- 3. Train on every worker ----------------------------------------------------------------
train=$(quote python3 -m mim_jax.main --config "$config" --workdir "$workdir" \
  --distributed "${forward[@]}")
# Each worker: its number from the metadata server (as jax.distributed reads it), the full log
# in ~/mim_jax_logs/RUN_ID.log, and every line sent back prefixed with "[worker N]".
worker_id='$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'
remote="set -o pipefail; cd ~/$REMOTE_DIR && export TF_CPP_MIN_LOG_LEVEL=2 && w=$worker_id && mkdir -p ~/mim_jax_logs && $train 2>&1 | tee -a ~/mim_jax_logs/$run_id.log | sed -u \"s/^/[worker \$w] /\""
log="$repo/logs/tpu/$run_id.log"
if [ "$DRY_RUN" = 1 ]; then
  show "${tpu[@]}" ssh "$NAME" "${where[@]}" --worker=all --command "$remote"
  echo "# output of all workers would go to $log" >&2
  exit 0
fi
mkdir -p "$(dirname "$log")"
echo "Training on every worker of $NAME; log: $log" >&2
status=0
run "${tpu[@]}" ssh "$NAME" "${where[@]}" --worker=all --command "$remote" 2>&1 \
  | tee -a "$log" || status=$?
echo "mim_jax on $NAME finished with status $status (log: $log)." >&2
exit "$status"
