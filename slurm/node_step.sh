#!/bin/bash
# One node's share of a multi-node run. dl_launch (common.sh) starts it once per node with srun:
# it stages this node's own scratch copy (TMPDIR is node-local), runs torchrun with this node's
# rank, copies results back (only rank 0 writes any) and removes the scratch directory.
# A run stopped by a signal (it saved its state) exits 0 here: srun --kill-on-bad-exit would otherwise
# kill the other nodes' steps before they remove their scratch copies. The batch shell, which
# forwarded the signal, requeues the job (after SIGUSR1).
DL_NODE_STEP=1
# shellcheck source=slurm/common.sh
source "$DL_REPO/slurm/common.sh"
# shellcheck disable=SC2086  # checkpoint names, no spaces
dl_stage ${DL_STAGED:-}
status=0
dl_launch "$@" || status=$?
if (( status != 0 )) && [[ -n "${DL_SIGNALLED:-}" ]]; then
    dl_log "node ${SLURM_NODEID:-0}: the run stopped on a signal (exit status $status)"
    status=0
fi
exit "$status"
