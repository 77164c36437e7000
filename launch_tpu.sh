#!/usr/bin/env bash
# launch_tpu.sh: run `cslm-jax train` on a Cloud TPU VM slice (one host or a multi-host pod).
# Every gcloud call goes through run_gcloud, which --dry-run turns into a printout. See --help.
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "$0")" && pwd)
GCLOUD=${GCLOUD:-gcloud}                 # tests point this at a fake

usage() {
    cat <<EOF
Usage: $PROG [options] COMMAND [-- extra cslm-jax train arguments]

Runs cslm_jax on a Cloud TPU VM slice: the same \`cslm-jax train\` command on every worker
(JAX joins the workers into one job by itself), checkpoints and metrics in a run folder every
worker shares, per-worker logs, and a loop that recreates the slice and resumes after a
preemption (resuming is automatic: the run folder holds the checkpoints).

Commands:
  create    create the TPU VM (or, with --queued, a queued resource) and wait until it is ready
  setup     copy this checkout (or clone --repo) to every worker, install requirements.txt and
            jax[tpu] in a virtual environment there (--worker=all); mount --bucket if given
  train     start the training command on every worker (--worker=all), detached; logs go to
            ~/cslm_logs/train.log on each worker; with --wait, watch it until it ends
  run       create (if needed) + setup + train + watch; after a preemption delete, recreate,
            set up and train again (resumes from the last checkpoint), up to --max-restarts
  status    the slice's state, per worker whether training runs or how it exited, and the run
            folder's progress: last metrics line and committed checkpoints (a gs:// run folder
            is read from here with gcloud storage, a mounted one through worker 0)
  logs      the last --lines lines of each worker's log (--log-worker N for one worker)
  stop      SIGTERM training on every worker: it writes a checkpoint and exits with code 75
  delete    delete the TPU VM / queued resource (a gs:// run folder stays in its bucket)

Options (environment variable in brackets):
  --name NAME           TPU name [TPU_NAME, default cslm]
  --zone ZONE           zone, e.g. us-east5-a [TPU_ZONE, required]
  --project PROJECT     Google Cloud project [TPU_PROJECT, default: gcloud's]
  --type TYPE           accelerator type: v4-32, v5litepod-16, v5p-8, v6e-8 ... [TPU_TYPE]
  --runtime VERSION     TPU software version [TPU_RUNTIME, default by generation:
                        v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                        v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e]
  --spot                spot capacity (cheaper, preemptible; use with run)
  --queued              create through a queued resource (waits for capacity)
  --config FILE         run config, relative to the project (train, run)
  --run-dir DIR         run folder every worker sees (train, run, status): gs://BUCKET/runs/stage1
                        (written directly, with Orbax's commit files) or a shared mount
  --bucket BUCKET       optional: also mount gs://BUCKET at /mnt/BUCKET on every worker with
                        gcsfuse (setup), for tools that need local paths
  --repo URL [--ref R]  clone this git repository on the workers instead of copying the checkout
  --python VERSION      Python for the workers' environment (installed by uv) [default 3.11]
  --wait                train: watch until training ends; exit with its code
  --poll SECONDS        how often to check a running job [default 300]
  --max-restarts N      run: give up after N recreations [default 20]
  --log-worker N        logs: only worker N
  --lines N             logs: lines per worker [default 50]
  --dry-run             print every gcloud command instead of running it
  -h, --help            this text

Example: a v5p-32 spot slice, stage 1, run folder, checkpoint and data in a bucket:
  $PROG --zone us-east5-a --type v5p-32 --spot \\
      --config configs/cslm_pretrain.yaml --run-dir gs://my-bucket/runs/stage1 run -- \\
      --init-from gs://my-bucket/ckpt/llama31_cslm data.config=gs://my-bucket/data/cslm.yaml

Before booking: cslm-jax compile --config CFG --model MODEL.yaml --topology v5p:2x2x4 tells
whether the step fits the slice (README "Running on a TPU pod").
Exit codes: 0 done; 2 bad usage; 75 training stopped by \`stop\`; 100 (train --wait) the slice
was preempted or lost, or a preemption notice stopped training; otherwise the training's
(3 non-finite loss, 2 bad configuration) or gcloud's exit code.
EOF
}

die() { echo "$PROG: $*" >&2; exit 2; }
say() { echo "$PROG: $*" >&2; }

# -- options ------------------------------------------------------------------------------------
NAME=${TPU_NAME:-cslm}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
TYPE=${TPU_TYPE:-}
RUNTIME=${TPU_RUNTIME:-}
SPOT=0 QUEUED=0 DRY_RUN=0 WAIT=0
CONFIG="" RUN_DIR="" BUCKET="" REPO_URL="" REF="" PY_VERSION=3.11
POLL=300 MAX_RESTARTS=20 LOG_WORKER="" LINES=50
COMMAND=""
TRAIN_ARGS=()

need_value() { [ $# -ge 2 ] && [ -n "$2" ] || die "option $1 needs a value (see --help)"; }

while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --name) need_value "$@"; NAME=$2; shift ;;
        --zone) need_value "$@"; ZONE=$2; shift ;;
        --project) need_value "$@"; PROJECT=$2; shift ;;
        --type|--accelerator-type) need_value "$@"; TYPE=$2; shift ;;
        --runtime|--version) need_value "$@"; RUNTIME=$2; shift ;;
        --config) need_value "$@"; CONFIG=$2; shift ;;
        --run-dir) need_value "$@"; RUN_DIR=$2; shift ;;
        --bucket) need_value "$@"; BUCKET=${2#gs://}; BUCKET=${BUCKET%/}; shift ;;
        --repo) need_value "$@"; REPO_URL=$2; shift ;;
        --ref) need_value "$@"; REF=$2; shift ;;
        --python) need_value "$@"; PY_VERSION=$2; shift ;;
        --poll) need_value "$@"; POLL=$2; shift ;;
        --max-restarts) need_value "$@"; MAX_RESTARTS=$2; shift ;;
        --log-worker) need_value "$@"; LOG_WORKER=$2; shift ;;
        --lines) need_value "$@"; LINES=$2; shift ;;
        --spot) SPOT=1 ;;
        --queued) QUEUED=1 ;;
        --wait) WAIT=1 ;;
        --dry-run) DRY_RUN=1 ;;
        --) shift; TRAIN_ARGS=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [ -z "$COMMAND" ] || die "one command at a time (got $COMMAND and $1)"; COMMAND=$1 ;;
    esac
    shift
done

[ -n "$COMMAND" ] || { usage >&2; exit 2; }
case "$COMMAND" in
    create|setup|train|run|status|logs|stop|delete) ;;
    *) die "unknown command '$COMMAND' (commands: create setup train run status logs stop delete)" ;;
esac
[ -n "$ZONE" ] || die "--zone (or TPU_ZONE) is required"
for number in "$POLL" "$MAX_RESTARTS" "$LINES" ${LOG_WORKER:+"$LOG_WORKER"}; do
    [[ "$number" =~ ^[0-9]+$ ]] || die "expected a whole number, got '$number'"
done

default_runtime() {
    case "$1" in
        v4-*) echo tpu-ubuntu2204-base ;;
        v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
        v5p-*) echo v2-alpha-tpuv5 ;;
        v6e-*) echo v2-alpha-tpuv6e ;;
        *) return 1 ;;
    esac
}

needs_type() {
    [ -n "$TYPE" ] || die "--type (or TPU_TYPE) is required for $COMMAND, e.g. v5p-8"
    if [ -z "$RUNTIME" ]; then
        RUNTIME=$(default_runtime "$TYPE") || die "no default runtime for --type $TYPE; pass --runtime"
    fi
}

needs_train_args() {
    [ -n "$CONFIG" ] || die "--config is required for $COMMAND"
    [ -n "$RUN_DIR" ] || die "--run-dir is required for $COMMAND (a folder every worker shares)"
}

# -- gcloud -------------------------------------------------------------------------------------
LOCATION=(--zone="$ZONE")
[ -z "$PROJECT" ] || LOCATION+=(--project="$PROJECT")

# Shell-quote each argument (single quotes where needed, as Python's shlex.quote): the same
# text is what a worker's shell parses and what --dry-run prints.
quote() {
    local out="" a q="'"
    for a in "$@"; do
        if [[ -n "$a" && "$a" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
            out+="$a "
        else
            out+="'${a//$q/$q\\$q$q}' "
        fi
    done
    echo "${out% }"
}

run_gcloud() {            # run (or, with --dry-run, print) one gcloud command
    if [ "$DRY_RUN" = 1 ]; then
        quote "$GCLOUD" "$@"
        return 0
    fi
    "$GCLOUD" "$@"
}

query_gcloud() {          # a read-only query: never printed as an action; empty in a dry run
    [ "$DRY_RUN" = 1 ] && return 0
    "$GCLOUD" "$@" 2>/dev/null
}

on_workers() {            # on_workers WORKER SCRIPT: run a bash script on one or all workers
    run_gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$1" --command="$2"
}

# The slice's state: READY, PENDING (being created / waiting for capacity), GONE (no such
# resource), or the provider's word for a dead slice (PREEMPTED, TERMINATED, SUSPENDED, FAILED...).
tpu_state() {
    local state
    if [ "$QUEUED" = 1 ]; then
        state=$(query_gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}" \
            --format='value(state.state)') || { echo GONE; return; }
        case "$state" in
            ACTIVE) echo READY ;;
            ACCEPTED|PROVISIONING|WAITING_FOR_RESOURCES|CREATING) echo PENDING ;;
            "") echo GONE ;;
            *) echo "$state" ;;
        esac
    else
        state=$(query_gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" \
            --format='value(state)') || { echo GONE; return; }
        case "$state" in
            READY) echo READY ;;
            CREATING|STARTING|RESTARTING|REPAIRING) echo PENDING ;;
            "") echo GONE ;;
            *) echo "$state" ;;
        esac
    fi
}

# Scripts run on the workers (their $ expressions expand there, not here). A worker's files:
# ~/cslm_jax (the project and .venv), ~/cslm_logs/{train.log,train.pid,exit_code,stopped}.
# shellcheck disable=SC2016
REMOTE_JOB_STATUS='cd "$HOME/cslm_logs" 2>/dev/null || { echo unknown; exit 0; }; if [ -f exit_code ]; then echo "exit $(cat exit_code)"; elif [ -f train.pid ] && kill -0 "$(cat train.pid)" 2>/dev/null; then echo running; else echo unknown; fi'
# shellcheck disable=SC2016
REMOTE_STOPPED='test -f "$HOME/cslm_logs/stopped"'
# shellcheck disable=SC2016
REMOTE_STATUS='cd "$HOME/cslm_logs" 2>/dev/null || { echo "$(hostname): never trained"; exit 0; }; if [ -f exit_code ]; then echo "$(hostname): exited with $(cat exit_code)"; elif [ -f train.pid ] && kill -0 "$(cat train.pid)" 2>/dev/null; then echo "$(hostname): training (pid $(cat train.pid))"; else echo "$(hostname): not running"; fi; grep -E "^step [0-9]+:" train.log 2>/dev/null | tail -n 1 || true'
# shellcheck disable=SC2016
REMOTE_STOP='cd "$HOME/cslm_logs" 2>/dev/null || exit 0; if [ -f train.pid ] && kill -0 "$(cat train.pid)" 2>/dev/null; then touch stopped; kill -TERM -- "-$(cat train.pid)"; echo "$(hostname): SIGTERM sent (checkpoint, then exit 75)"; else echo "$(hostname): not running"; fi'

# -- commands ------------------------------------------------------------------------------------
cmd_create() {
    needs_type
    local extra=()
    [ "$SPOT" = 0 ] || extra+=(--spot)
    if [ "$QUEUED" = 1 ]; then
        run_gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${LOCATION[@]}" \
            --accelerator-type="$TYPE" --runtime-version="$RUNTIME" "${extra[@]}"
    else
        run_gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" \
            --accelerator-type="$TYPE" --version="$RUNTIME" "${extra[@]}"
    fi
    [ "$DRY_RUN" = 1 ] && return 0
    local state
    while true; do
        state=$(tpu_state)
        case "$state" in
            READY) say "$NAME is ready"; return 0 ;;
            PENDING|GONE) say "$NAME: waiting (${state})"; sleep 30 ;;
            *) say "$NAME: $state while being created"; return 1 ;;
        esac
    done
}

# The project on the workers: ~/cslm_jax with a virtual environment .venv (Python $PY_VERSION
# from uv: TPU VM images ship an older python3) holding requirements.txt and jax[tpu].
cmd_setup() {
    local jax_version fetch install mount=""
    jax_version=$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "$HERE/requirements.txt")
    [ -n "$jax_version" ] || die "$HERE/requirements.txt pins no jax==VERSION"
    if [ -n "$REPO_URL" ]; then
        fetch="rm -rf \"\$HOME/cslm_jax\" && git clone --depth 1 ${REF:+--branch $(quote "$REF")} $(quote "$REPO_URL") \"\$HOME/cslm_jax\""
    else
        local archive="${TMPDIR:-/tmp}/cslm_jax.tgz"
        # the files git would keep: tracked and untracked-but-not-ignored (no runs, no .venv)
        if [ "$DRY_RUN" = 1 ]; then
            echo "# (cd $(quote "$HERE") && git ls-files -co --exclude-standard | tar -czf $(quote "$archive") -T -)"
        else
            archive=$(mktemp -d)/cslm_jax.tgz
            (cd "$HERE" && git ls-files -co --exclude-standard -z \
                | while IFS= read -r -d '' f; do [ ! -e "$f" ] || printf '%s\0' "$f"; done \
                | tar -czf "$archive" --null -T -)
        fi
        run_gcloud compute tpus tpu-vm scp "$archive" "$NAME:cslm_jax.tgz" "${LOCATION[@]}" --worker=all
        fetch="rm -rf \"\$HOME/cslm_jax\" && mkdir -p \"\$HOME/cslm_jax\" && tar -xzf \"\$HOME/cslm_jax.tgz\" -C \"\$HOME/cslm_jax\""
    fi
    install="set -e; $fetch && cd \"\$HOME/cslm_jax\""
    install+=" && (command -v uv >/dev/null || [ -x \"\$HOME/.local/bin/uv\" ] || curl -LsSf https://astral.sh/uv/install.sh | sh)"
    install+=" && export PATH=\"\$HOME/.local/bin:\$PATH\" && uv venv --python $(quote "$PY_VERSION") .venv"
    install+=" && . .venv/bin/activate && uv pip install -r requirements.txt $(quote "jax[tpu]==$jax_version")"
    install+=" && uv pip install --no-deps -e . && cslm-jax --help >/dev/null && echo \"cslm_jax ready on \$(hostname)\""
    if [ -n "$BUCKET" ]; then
        local b
        b=$(quote "$BUCKET")
        mount="set -e; if ! command -v gcsfuse >/dev/null; then"
        mount+=" echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
        mount+=" && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null"
        mount+=" && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi"
        mount+="; sudo mkdir -p /mnt/$b && sudo chown \"\$(id -u):\$(id -g)\" /mnt/$b"
        mount+="; mountpoint -q /mnt/$b || gcsfuse --implicit-dirs --rename-dir-limit=200000 $b /mnt/$b"
        on_workers all "$mount"
    fi
    on_workers all "$install"
}

# The training command, identical on every worker. Its wrapper records the exit code; it traps
# SIGTERM (deferred until training has written its checkpoint and exited) so that `stop` and a
# preemption notice still leave ~/cslm_logs/exit_code behind.
train_script() {
    local train
    train="cslm-jax train --config $(quote "$CONFIG") --run-dir $(quote "$RUN_DIR")"
    [ ${#TRAIN_ARGS[@]} -eq 0 ] || train+=" $(quote "${TRAIN_ARGS[@]}")"
    cat <<EOF
set -e; cd "\$HOME/cslm_jax"; . .venv/bin/activate; mkdir -p "\$HOME/cslm_logs"; cd "\$HOME/cslm_logs"; if [ -f train.pid ] && kill -0 "\$(cat train.pid)" 2>/dev/null; then echo "\$(hostname): already training (pid \$(cat train.pid))"; exit 0; fi; rm -f exit_code stopped; cd "\$HOME/cslm_jax"; nohup setsid bash -c $(quote "trap : TERM; $train >> \"\$HOME/cslm_logs/train.log\" 2>&1; echo \$? > \"\$HOME/cslm_logs/exit_code\"") > /dev/null 2>&1 < /dev/null & echo \$! > "\$HOME/cslm_logs/train.pid"; echo "\$(hostname): training started (pid \$!, log ~/cslm_logs/train.log)"
EOF
}

cmd_train() {
    needs_train_args
    echo "# on every worker: cslm-jax train --config $CONFIG --run-dir $RUN_DIR ${TRAIN_ARGS[*]:-}" >&2
    on_workers all "$(train_script)"
    if [ "$WAIT" = 1 ]; then
        watch_training
    fi
}

# Worker 0's view of the job: "running", "exit N" (N the training's exit code), or "unknown".
job_status() {
    local out
    out=$(query_gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=0 \
        --command="$REMOTE_JOB_STATUS") || { echo unknown; return; }
    echo "$out" | tail -n 1
}

# Watch a started job. Returns 0 when training finished; 75 when it was stopped by `stop`;
# 100 when the slice was lost or preempted (or a preemption notice stopped training: exit 75
# without `stop`); the training's exit code otherwise.
watch_training() {
    if [ "$DRY_RUN" = 1 ]; then
        say "dry run: would now poll every ${POLL}s: $(quote "$GCLOUD" compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}") and worker 0's ~/cslm_logs/exit_code"
        return 0
    fi
    local state status
    while true; do
        sleep "$POLL"
        state=$(tpu_state)
        if [ "$state" != READY ]; then
            say "$NAME is $state: the slice was preempted or lost"
            return 100
        fi
        status=$(job_status)
        case "$status" in
            running|unknown) ;;
            "exit 0") say "training finished"; return 0 ;;
            "exit 75")
                if query_gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=0 \
                        --command="$REMOTE_STOPPED"; then
                    say "training stopped by '$PROG stop' (checkpoint written)"; return 75
                fi
                say "training received SIGTERM (maintenance or preemption notice; checkpoint written)"
                return 100 ;;
            "exit "*) say "training failed with ${status#exit } (see '$PROG logs')"; return "${status#exit }" ;;
        esac
    done
}

cmd_run() {
    needs_type
    needs_train_args
    local restarts=0 state code
    while true; do
        state=$(tpu_state)
        case "$state" in
            READY) say "$NAME is ready" ;;
            GONE) cmd_create ;;
            PENDING) cmd_create_wait ;;
            *) say "$NAME is $state: deleting it to recreate"; cmd_delete; cmd_create ;;
        esac
        cmd_setup
        cmd_train
        [ "$DRY_RUN" = 1 ] && { watch_training; return 0; }
        code=0
        watch_training || code=$?
        [ "$code" = 100 ] || return "$code"
        restarts=$((restarts + 1))
        if [ "$restarts" -gt "$MAX_RESTARTS" ]; then
            say "preempted $restarts times: giving up (--max-restarts $MAX_RESTARTS)"
            return 1
        fi
        say "recreating $NAME and resuming (restart $restarts of at most $MAX_RESTARTS)"
        state=$(tpu_state)
        if [ "$state" != GONE ]; then
            cmd_delete
        fi
    done
}

cmd_create_wait() {        # the slice is being created already: wait for it
    local state
    while true; do
        state=$(tpu_state)
        case "$state" in
            READY) return 0 ;;
            PENDING) say "$NAME: waiting (PENDING)"; sleep 30 ;;
            GONE) cmd_create; return ;;
            *) say "$NAME: $state while being created"; return 1 ;;
        esac
    done
}

cmd_status() {
    local state
    state=$(tpu_state)
    echo "$NAME ($ZONE): $state"
    if [ "$state" = READY ] || [ "$DRY_RUN" = 1 ]; then
        on_workers all "$REMOTE_STATUS"
    fi
    [ -n "$RUN_DIR" ] && run_progress
    return 0
}

# The run folder's progress, whether or not the slice still exists: its last metrics line and its
# committed checkpoints (a step folder with Orbax's commit_success.txt; on a mount, any step folder).
run_progress() {
    local last ckpts
    if [[ "$RUN_DIR" == gs://* ]]; then
        if [ "$DRY_RUN" = 1 ]; then
            quote "$GCLOUD" storage cat "$RUN_DIR/metrics.jsonl"
            quote "$GCLOUD" storage ls "$RUN_DIR/checkpoints/*/commit_success.txt"
            return 0
        fi
        last=$("$GCLOUD" storage cat "$RUN_DIR/metrics.jsonl" 2>/dev/null | tail -n 1) || true
        ckpts=$("$GCLOUD" storage ls "$RUN_DIR/checkpoints/*/commit_success.txt" 2>/dev/null \
            | sed -E 's#.*/checkpoints/([0-9]+)/commit_success.txt#\1#' | sort -n | tr '\n' ' ') || true
    else
        local script out
        script="echo \"last: \$(tail -n 1 $(quote "$RUN_DIR/metrics.jsonl") 2>/dev/null)\"; echo \"ckpts: \$(ls $(quote "$RUN_DIR/checkpoints") 2>/dev/null | grep -E '^[0-9]+\$' | sort -n | tr '\\n' ' ')\""
        if [ "$DRY_RUN" = 1 ]; then
            on_workers 0 "$script"
            return 0
        fi
        out=$(query_gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=0 --command="$script") || true
        last=$(echo "$out" | sed -n 's/^last: //p')
        ckpts=$(echo "$out" | sed -n 's/^ckpts: //p')
    fi
    echo "run folder $RUN_DIR"
    echo "  last metrics: ${last:-(none yet)}"
    echo "  checkpoints:  ${ckpts:-(none committed yet)}"
}

cmd_logs() {
    on_workers "${LOG_WORKER:-all}" "echo \"== \$(hostname): ~/cslm_logs/train.log\"; tail -n $LINES \"\$HOME/cslm_logs/train.log\" 2>/dev/null || echo '(no log yet)'"
}

cmd_stop() {
    on_workers all "$REMOTE_STOP"
}

cmd_delete() {
    if [ "$QUEUED" = 1 ]; then
        run_gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
    else
        run_gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
    fi
}

"cmd_$COMMAND"
