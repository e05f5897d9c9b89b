#!/usr/bin/env bash
# Submit a batch script to the best GPU type that is free now.
#
#   bash submit_best_gpu.sh [--dry-run] slurm/distill_cnn.slurm [extra sbatch args...]
#
# Asks `sinfo` which GPU types the partition has (node features, or typed gres such as gpu:h100:4)
# and how many of their nodes are idle or partly used, then picks by a preference list: the first
# preferred type with an idle node, else the first with a partly used node, else the first present.
# It submits with the matching constraint (-C TYPE) or typed gres (--gres=gpu:TYPE:1) and prints
# the job id. When nothing can be determined it submits plainly and says so. --dry-run prints the
# sbatch command instead of running it.
#
# Settings: DL_GPU_PREFERENCE (default "h200 h100 a100 l40s a40 a6000 v100 rtx"), DL_PARTITION
# (default: the script's #SBATCH --partition, else the cluster's default partition).
set -euo pipefail

dry_run=0
args=()
for arg in "$@"; do  # --dry-run may come anywhere
    if [[ "$arg" == --dry-run ]]; then dry_run=1; else args+=("$arg"); fi
done
set -- ${args[@]+"${args[@]}"}
if [[ $# -lt 1 ]]; then
    echo "usage: bash submit_best_gpu.sh [--dry-run] SCRIPT.slurm [sbatch args...]" >&2
    exit 2
fi
script=$1; shift
if [[ ! -f "$script" ]]; then
    echo "error: batch script not found: $script" >&2
    exit 2
fi
# Jobs run from the repository root (their logs go to slurm/logs/ there, common.sh finds the code
# there), from whichever directory this is called.
script=$(cd "$(dirname "$script")" && pwd)/$(basename "$script")
cd "$(dirname "${BASH_SOURCE[0]}")"

preference=${DL_GPU_PREFERENCE:-h200 h100 a100 l40s a40 a6000 v100 rtx}
partition=$(sed -n -E 's/^#SBATCH[[:space:]]+(--partition=|-p[[:space:]]*)([^[:space:]]+).*/\2/p' "$script" | head -n 1)
partition=${DL_PARTITION:-$partition}  # empty: the cluster's default partition

# One line per node group: features|gres|state|node count.
nodes=$(sinfo -h ${partition:+-p "$partition"} -o '%f|%G|%T|%D' 2>/dev/null) || nodes=""

# count TYPE STATES...: nodes of TYPE (feature or gres type) in any of STATES ("any" for all).
count() {
    local type=$1; shift
    awk -F'|' -v type="$type" -v states="$*" '
        BEGIN { n = split(states, s, " "); for (i = 1; i <= n; i++) want[s[i]] = 1 }
        {
            has = 0
            m = split($1, f, ","); for (i = 1; i <= m; i++) if (tolower(f[i]) == type) has = 1
            if (tolower($2) ~ ("gpu:" type "(:|$|\\()")) has = 2
            state = $3; sub(/[*~#!%$@^-]+$/, "", state)
            if (has && (want["any"] || want[state])) total += $4
        }
        END { print total + 0 }' <<<"$nodes"
}

# how TYPE: "feature" or "gres" (how the cluster names it).
how() {
    awk -F'|' -v type="$1" '
        { m = split($1, f, ","); for (i = 1; i <= m; i++) if (tolower(f[i]) == type) { print "feature"; exit } }
        tolower($2) ~ ("gpu:" type "(:|$|\\()") { print "gres"; exit }' <<<"$nodes"
}

choice="" reason=""
if [[ -n "$nodes" ]]; then
    for states in "idle" "mixed" "any"; do
        for type in $preference; do
            n=$(count "$type" $states)
            if (( n > 0 )); then choice=$type; reason="$n node(s) $states"; break 2; fi
        done
    done
fi

extra=()
if [[ -n "$choice" ]]; then
    if [[ $(how "$choice") == feature ]]; then extra=(-C "$choice"); else extra=("--gres=gpu:$choice:1"); fi
    echo "submit_best_gpu: partition ${partition:-(default)}, choosing $choice ($reason) among: $preference" >&2
else
    echo "submit_best_gpu: could not tell the GPU types of partition ${partition:-(default)} (sinfo gave nothing known);" \
         "submitting without a GPU type" >&2
fi

cmd=(sbatch --parsable ${partition:+--partition="$partition"} ${extra[@]+"${extra[@]}"} "$@" "$script")
if (( dry_run )); then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
job=$("${cmd[@]}")
echo "${job%%;*}"
