#!/usr/bin/env bash
# Rendered from the job table in distillation_lab/chain.py: edit the table, then run python -m distillation_lab.chain --write.
# Submit the whole lab chain: every job of the table in distillation_lab/chain.py, each after the
# jobs it needs (afterok). With --kill-on-invalid-dep=yes a failed job cancels its dependants instead
# of leaving them pending forever.
#
#   bash slurm/submit_chain.sh [--smoke] [--dry-run] [extra sbatch args...]
#
# --smoke: the smoke preset (embedded data, tiny models, a few steps, CPU): the chain in minutes.
# --dry-run: print the sbatch commands (with placeholder job ids) instead of submitting.
# Every job goes through submit_best_gpu.sh. Run it from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."

dry=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --smoke) export DL_SMOKE=1; shift ;;
        --dry-run) dry=(--dry-run); shift ;;
        *) break ;;
    esac
done
submit() {  # submit SCRIPT [sbatch args...] -> prints the job id (a placeholder in a dry run)
    if (( ${#dry[@]} )); then
        bash submit_best_gpu.sh --dry-run "$@" >&2
        echo "<$(basename "$1" .slurm)>"
    else
        bash submit_best_gpu.sh "$@"
    fi
}

after() { echo "--dependency=afterok:$1" --kill-on-invalid-dep=yes; }

# shellcheck disable=SC2046  # after() yields two words on purpose
{
    cnn_teacher=$(submit slurm/train_cnn_teacher.slurm "$@")
    vit_teacher=$(submit slurm/train_vit_teacher.slurm "$@")
    tweet_bert=$(submit slurm/train_tweet_bert.slurm "$@")
    cnn_student=$(submit slurm/train_cnn_student_baseline.slurm $(after "$cnn_teacher") "$@")
    cnn_student_kd=$(submit slurm/distill_cnn.slurm $(after "$cnn_teacher") "$@")
    vit_student=$(submit slurm/train_vit_student_baseline.slurm $(after "$vit_teacher") "$@")
    vit_student_kd=$(submit slurm/distill_vit.slurm $(after "$vit_teacher") "$@")
    text_student=$(submit slurm/train_text_student_baseline.slurm $(after "$tweet_bert") "$@")
    text_student_kd=$(submit slurm/distill_text.slurm $(after "$tweet_bert") "$@")
    vit_teacher_clos=$(submit slurm/clos_convert_vit.slurm $(after "$vit_teacher") "$@")
    tweet_bert_clos=$(submit slurm/clos_convert_bert.slurm $(after "$tweet_bert") "$@")
    cnn_teacher_pruned=$(submit slurm/prune_cnn.slurm $(after "$cnn_teacher") "$@")
    vit_teacher_pruned=$(submit slurm/prune_vit.slurm $(after "$vit_teacher") "$@")
    report=$(submit slurm/report.slurm $(after "$cnn_teacher:$vit_teacher:$cnn_student:$cnn_student_kd:$vit_student:$vit_student_kd:$text_student:$text_student_kd:$vit_teacher_clos:$tweet_bert_clos:$cnn_teacher_pruned:$vit_teacher_pruned") "$@")
}
echo "submitted: cnn_teacher=$cnn_teacher vit_teacher=$vit_teacher tweet_bert=$tweet_bert" \
     "cnn_student=$cnn_student cnn_student_kd=$cnn_student_kd vit_student=$vit_student" \
     "vit_student_kd=$vit_student_kd text_student=$text_student text_student_kd=$text_student_kd" \
     "vit_teacher_clos=$vit_teacher_clos tweet_bert_clos=$tweet_bert_clos" \
     "cnn_teacher_pruned=$cnn_teacher_pruned vit_teacher_pruned=$vit_teacher_pruned" \
     "report=$report"
