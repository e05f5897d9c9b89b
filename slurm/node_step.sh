#!/bin/bash
# One node's share of a multi-node run. dl_launch (common.sh) starts it once per node with srun:
# it stages this node's own scratch copy (TMPDIR is node-local), runs torchrun with this node's
# rank, copies results back (only rank 0 writes any) and removes the scratch directory.
DL_NODE_STEP=1
# shellcheck source=slurm/common.sh
source "$DL_REPO/slurm/common.sh"
# shellcheck disable=SC2086  # checkpoint names, no spaces
dl_stage ${DL_STAGED:-}
dl_launch "$@"
