# shellcheck shell=bash
# Shared prologue of every distill-lab batch job; sourced by slurm/*.slurm, never run on its own.
#
# It loads the cluster modules, activates the venv in $HOME (never copied), stages the code and the
# job's inputs into a per-job scratch directory under $TMPDIR, runs one main.py subcommand there,
# and copies checkpoints and logs back to models_saved/ while it runs (every DL_SYNC_INTERVAL
# seconds, so a dead node loses minutes, not the job) and when the job ends for any reason (success,
# failure, time limit, preemption, scancel), then removes the scratch directory. A training job
# stopped by a signal saves its last checkpoint; after SIGUSR1 (the time-limit warning of
# --signal=B:USR1@300) the job requeues itself to resume from it. After SIGTERM (a user's scancel, or
# a preemption, which SLURM itself requeues where the cluster is set up so) it ends.
# Without SLURM (`bash slurm/distill_cnn.slurm` on a workstation) the same script runs locally.
#
# Settings (environment variables, all optional):
#   DL_REPO        the repository (default: the submit directory, or the script's parent)
#   DL_MODULES     modules to load (default: "Python/3.11.3-GCCcore-12.3.0 CUDA/12.1.1"; "" for none)
#   DL_VENV        the venv to activate (default: the one active when the job was submitted, else
#                  $HOME/.venvs/edl, else the repo's .venv)
#   DL_DATA_DIR    datasets to stage (default: $DL_REPO/data)
#   DL_MODELS_DIR  where checkpoints live (default: $DL_REPO/models_saved)
#   DL_SMOKE=1     the smoke preset: embedded data, tiny models, a few steps, CPU (tests, dry runs);
#                  each script's DL_SMOKE_ARGS (from the job table) says what that means for its job
#   DL_EXTRA_ARGS  more main.py flags for every job (after the smoke flags: e.g. "--epochs 60" wins)
#   DL_NPROC       data-parallel processes per node (default: the GPUs allocated on the node, else 1);
#                  above 1 the run is launched with torchrun (one process per GPU; gloo on CPU)
#   DL_MASTER_PORT the rendezvous port of a multi-node run (default: 29500 + job id mod 1000)
#   DL_SYNC_INTERVAL seconds between copies of the scratch results back to DL_MODELS_DIR while the
#                  job runs (default 300; 0: only at the end)
# Several nodes (sbatch --nodes=N): srun starts slurm/node_step.sh once per node; each node stages its
# own scratch copy (TMPDIR is node-local) and runs torchrun with its node rank; rank 0, on the first
# node, writes the checkpoints and copies them back.
set -euo pipefail

dl_log() { echo "[distill-lab $(date +%H:%M:%S)] $*" >&2; }

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    DL_REPO=${DL_REPO:-${SLURM_SUBMIT_DIR}}
else
    DL_REPO=${DL_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
fi
DL_DATA_DIR=${DL_DATA_DIR:-$DL_REPO/data}
DL_MODELS_DIR=${DL_MODELS_DIR:-$DL_REPO/models_saved}
DL_MODULES=${DL_MODULES-Python/3.11.3-GCCcore-12.3.0 CUDA/12.1.1}
[[ -f "$DL_REPO/main.py" ]] || { dl_log "error: $DL_REPO is not the distill-lab repository (set DL_REPO)"; exit 2; }

dl_load_modules() {
    [[ -z "$DL_MODULES" ]] && return 0
    if ! type module >/dev/null 2>&1; then
        dl_log "warning: 'module' is not available here; not loading $DL_MODULES"
        return 0
    fi
    # shellcheck disable=SC2086  # a list of module names
    module load $DL_MODULES
}

dl_activate_venv() {
    # DL_VENV, else the venv active where the job was submitted, else ~/.venvs/edl, else the repository's.
    local venv=${DL_VENV:-${VIRTUAL_ENV:-$HOME/.venvs/edl}}
    if [[ ! -f "$venv/bin/activate" && -z "${DL_VENV:-}" && -f "$DL_REPO/.venv/bin/activate" ]]; then
        venv=$DL_REPO/.venv
    fi
    if [[ -f "$venv/bin/activate" ]]; then
        # shellcheck disable=SC1091
        source "$venv/bin/activate"
    else
        dl_log "warning: no venv at $venv (set DL_VENV); using $(command -v python3)"
    fi
    DL_PYTHON=$(command -v python || command -v python3)
}

dl_make_scratch() {
    if (( DL_NNODES > 1 )) && [[ -z "${DL_NODE_STEP:-}" ]]; then
        return 0  # a multi-node job's batch shell only starts the steps; each node stages its own copy
    fi
    DL_SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/distill-lab.${SLURM_JOB_ID:-local}.XXXXXX")
    mkdir -p "$DL_SCRATCH/repo/models_saved"
    export TORCHINDUCTOR_CACHE_DIR="$DL_SCRATCH/torchinductor"  # keep torch's caches inside the scratch too
    # --log trackio: its database lives beside the models at home (one file that every job adds to), not in a
    # scratch copy that would replace it when copied back.
    export TRACKIO_DIR=${TRACKIO_DIR:-$DL_MODELS_DIR/trackio}
    cp -r "$DL_REPO/main.py" "$DL_REPO/pruning_lab" "$DL_REPO/distillation_lab" "$DL_SCRATCH/repo/"
    if [[ -d "$DL_DATA_DIR" ]]; then
        cp -r "$DL_DATA_DIR" "$DL_SCRATCH/repo/data"
    fi
    dl_log "job ${SLURM_JOB_ID:-local} on ${SLURMD_NODENAME:-$(hostname -s)}: scratch $DL_SCRATCH"
}

dl_copy_back() {
    [[ -n "${DL_SCRATCH:-}" && -d "$DL_SCRATCH/repo/models_saved" ]] || return 0
    # Of a multi-node run only the first node's copy has results (rank 0 writes); the others hold
    # nothing but staged inputs, by now stale, which must not overwrite them.
    [[ -n "${DL_NODE_STEP:-}" && "${SLURM_NODEID:-0}" != 0 ]] && return 0
    mkdir -p "$DL_MODELS_DIR"
    local f
    for f in "$DL_SCRATCH/repo/models_saved"/*; do
        # Files only: the curves' folders come back below (a plain cp of a folder fails and says so in the log).
        [[ -f "$f" ]] || continue
        # Staged inputs come back only if the job changed them.
        if [[ ! -e "$DL_MODELS_DIR/$(basename "$f")" ]] || ! cmp -s "$f" "$DL_MODELS_DIR/$(basename "$f")"; then
            cp "$f" "$DL_MODELS_DIR/.$(basename "$f").part" && mv "$DL_MODELS_DIR/.$(basename "$f").part" "$DL_MODELS_DIR/$(basename "$f")"
        fi
    done
    # Training curves (tensorboard/RUN/events.*, wandb/offline-run-*/ with --log wandb): each attempt of a run
    # writes its own file or folder, so copying everything never replaces an earlier attempt's.
    local curves
    for curves in tensorboard wandb; do
        if [[ -d "$DL_SCRATCH/repo/models_saved/$curves" ]]; then
            mkdir -p "$DL_MODELS_DIR/$curves"
            cp -r "$DL_SCRATCH/repo/models_saved/$curves/." "$DL_MODELS_DIR/$curves/"
        fi
    done
    for f in "$DL_SCRATCH/repo"/report.json "$DL_SCRATCH/repo"/report_details.json "$DL_SCRATCH/repo"/report.md \
             "$DL_SCRATCH/repo"/report.png "$DL_SCRATCH/repo"/report.html; do
        [[ -e "$f" ]] && cp "$f" "$DL_REPO/"
    done
    return 0
}

dl_cleanup() {
    local status=$?
    dl_copy_back || dl_log "warning: copying results back failed"
    [[ -n "${DL_SCRATCH:-}" ]] && rm -rf "$DL_SCRATCH"
    exit "$status"
}

dl_forward_signal() {
    dl_log "received $1: asking the run to save and stop"
    DL_SIGNALLED=$1
    [[ -n "${DL_CHILD:-}" ]] || return 0
    if [[ "${DL_LAUNCHER:-}" == torchrun ]]; then  # the training processes are torchrun's children
        pkill -"$1" -P "$DL_CHILD" 2>/dev/null || true
    else
        kill -s "$1" "$DL_CHILD" 2>/dev/null || true
    fi
}

# dl_start_sync / dl_stop_sync: copy results back every DL_SYNC_INTERVAL seconds while the run goes on.
dl_start_sync() {
    local interval=${DL_SYNC_INTERVAL:-300}
    [[ -n "${DL_SCRATCH:-}" ]] && (( interval > 0 )) || return 0
    (
        trap - EXIT USR1 TERM
        while sleep "$interval"; do dl_copy_back || true; done
    ) &
    DL_SYNC_PID=$!
}

dl_stop_sync() {
    [[ -n "${DL_SYNC_PID:-}" ]] || return 0
    pkill -P "$DL_SYNC_PID" 2>/dev/null || true  # its sleep
    kill "$DL_SYNC_PID" 2>/dev/null || true
    wait "$DL_SYNC_PID" 2>/dev/null || true
    DL_SYNC_PID=
}

# dl_stage FILE...: copy these files of models_saved/ into the scratch copy (teacher checkpoints,
# the last checkpoint to resume from). Missing ones are skipped. DL_STAGED remembers them, so that
# every node of a multi-node run stages the same files.
dl_stage() {
    local name
    for name in "$@"; do
        if [[ -f "$DL_MODELS_DIR/$name" ]]; then
            [[ -n "${DL_SCRATCH:-}" ]] && cp "$DL_MODELS_DIR/$name" "$DL_SCRATCH/repo/models_saved/$name"
            DL_STAGED="${DL_STAGED:-} $name"
        fi
    done
}

# dl_require FILE...: like dl_stage, for inputs the job cannot run without (a teacher checkpoint):
# a missing one stops the job at once, naming the real models folder and the job that writes it.
dl_require() {
    local name
    for name in "$@"; do
        if [[ ! -f "$DL_MODELS_DIR/$name" ]]; then
            dl_log "error: $DL_MODELS_DIR/$name not found: run the job that writes it first (slurm/submit_chain.sh runs them in order)"
            exit 2
        fi
    done
    dl_stage "$@"
}

# dl_stage_best_checkpoints: copy every best checkpoint (not the *_last.pth resume states).
dl_stage_best_checkpoints() {
    local f
    for f in "$DL_MODELS_DIR"/*.pth; do
        [[ -e "$f" && "$f" != *_last.pth ]] && dl_stage "$(basename "$f")"
    done
    return 0
}

# dl_run SUBCOMMAND ARGS...: run main.py in the scratch copy; a stopped training run requeues the job.
# With DL_SMOKE=1 the job's smoke flags (DL_SMOKE_ARGS, set by the script from the job table) follow.
dl_run() {
    local args=("$@")
    if [[ "${DL_SMOKE:-0}" == 1 ]]; then
        args+=(${DL_SMOKE_ARGS[@]+"${DL_SMOKE_ARGS[@]}"})
    fi
    # shellcheck disable=SC2206  # a user's list of flags
    [[ -n "${DL_EXTRA_ARGS:-}" ]] && args+=($DL_EXTRA_ARGS)
    local status=0
    dl_launch "${args[@]}" || status=$?
    # Exit status 3: the run saved its state after a stop signal (torchrun reports it as a failure;
    # node steps of a multi-node run report it as success, see node_step.sh).
    local stopped=0
    if (( status == 3 )) || [[ -n "${DL_SIGNALLED:-}" && ( $status -ne 0 || "$DL_LAUNCHER" == srun ) ]]; then
        stopped=1
    fi
    if [[ -n "${SLURM_JOB_ID:-}" ]] && (( stopped )); then
        dl_copy_back
        if [[ "${DL_SIGNALLED:-}" == USR1 ]]; then  # the time limit is near: continue in a new allocation
            dl_log "run saved its state; requeueing job $SLURM_JOB_ID to resume"
            scontrol requeue "$SLURM_JOB_ID" || dl_log "warning: scontrol requeue failed; resubmit to resume"
        else
            dl_log "run saved its state after SIG${DL_SIGNALLED:-TERM}; not requeued (resubmit the script to resume)"
        fi
    fi
    return "$status"
}

# dl_launch ARGS...: start main.py ARGS in the scratch copy (one process, torchrun on this node, or
# one step per node) and wait for it, also across the stop signals that the traps forward.
dl_launch() {
    if [[ -n "${DL_SCRATCH:-}" ]]; then
        cd "$DL_SCRATCH/repo"
        export DL_MODELS_DIR_SHOWN=$DL_MODELS_DIR  # main.py's errors name it, not the scratch copy
    fi
    dl_log "python main.py $*"
    local launch=("$DL_PYTHON" main.py) torchrun=("$DL_PYTHON" -m torch.distributed.run --nproc_per_node="$DL_NPROC")
    DL_LAUNCHER=python
    if [[ -n "${DL_NODE_STEP:-}" ]]; then  # one node of several: static rendezvous at the first node
        launch=("${torchrun[@]}" --nnodes="$SLURM_JOB_NUM_NODES" --node_rank="$SLURM_NODEID"
                --master_addr="$DL_MASTER_ADDR" --master_port="$DL_MASTER_PORT" main.py)
        DL_LAUNCHER=torchrun
    elif (( DL_NNODES > 1 )); then
        export DL_STAGED DL_NPROC DL_REPO DL_DATA_DIR DL_MODELS_DIR DL_MODULES
        export DL_MASTER_ADDR=${DL_MASTER_ADDR:-$(hostname)} DL_MASTER_PORT=${DL_MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
        dl_log "data-parallel: $DL_NNODES nodes x $DL_NPROC processes (torchrun per node, rendezvous $DL_MASTER_ADDR:$DL_MASTER_PORT)"
        launch=(srun --nodes="$DL_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
                ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} bash "$DL_REPO/slurm/node_step.sh")
        DL_LAUNCHER=srun  # srun passes the stop signals on to every node's step
    elif (( DL_NPROC > 1 )); then
        dl_log "data-parallel: $DL_NPROC processes with torchrun"
        launch=("${torchrun[@]}" --standalone main.py)
        DL_LAUNCHER=torchrun
    fi
    dl_start_sync
    set +e
    if [[ "$DL_LAUNCHER" == torchrun ]]; then
        # srun delivers a step's signals to every process in it: torchrun must outlive the USR1 that
        # asks its workers to save (they set their own handler), or it would die and leave them.
        (trap '' USR1; exec "${launch[@]}" "$@") &
    else
        "${launch[@]}" "$@" &
    fi
    DL_CHILD=$!
    local status
    while kill -0 "$DL_CHILD" 2>/dev/null; do  # a trapped signal ends `wait` early: wait for the save
        wait "$DL_CHILD"
    done
    wait "$DL_CHILD"  # bash keeps the exit status of a finished child
    status=$?
    set -e
    DL_CHILD=
    dl_stop_sync
    return "$status"
}

DL_NPROC=${DL_NPROC:-${SLURM_GPUS_ON_NODE:-1}}
DL_NNODES=${SLURM_JOB_NUM_NODES:-1}
trap dl_cleanup EXIT
trap 'dl_forward_signal USR1' USR1
trap 'dl_forward_signal TERM' TERM
dl_load_modules
dl_activate_venv
dl_make_scratch
