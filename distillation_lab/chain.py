"""The lab chain as one table: every job, what it runs, what it waits for, its resources, its smoke
settings and the report entry it fills.

The local pipeline (`pipeline.py`), the submitit chain (`submit.py`), the batch scripts in `slurm/`
and `slurm/submit_chain.sh` (rendered from this table by pure functions below and committed) and the
report (`report.py`) all read it: adding a job is one row. After editing the table run
`python -m distillation_lab.chain --write`; a test fails while a committed script differs from what
the table renders.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAINING_COMMANDS = ("train-teacher", "train-student", "distill")
MODELS_DIR = "models_saved"  # where jobs read and write checkpoints, relative to the repository
DEFAULT_PARTITION = "markov_gpu"  # the lab cluster's GPU partition: the batch scripts' and submitit's default
RENDERED_NOTE = ("# Rendered from the job table in distillation_lab/chain.py: edit the table, then run "
                 "python -m distillation_lab.chain --write.")

# The smoke preset (embedded data, tiny models, a few steps, CPU) per command; a row adds its own.
SMOKE = {
    "training": {"--dataset": "mnist_embedded", "--epochs": "1", "--max-steps-per-epoch": "2", "--batch-size": "32",
                 "--val-size": "100", "--device": "cpu", "--no-progress": None, "--model-args": "{width: 4}"},
    "clos-convert": {"--fit-sweeps": "3", "--als-iterations": "3", "--calibration-examples": "64",
                     "--device": "cpu",
                     "--allow-more-parameters": None},  # the smoke models' layers are too small for Clos to pay
    "prune": {"--device": "cpu", "--round-to": "1", "--finetune-epochs": "1"},  # the smoke models' widths are 4-32
    "report": {},
}
SMOKE_VIT = {"--model-args": "{depth: 1, embed_dim: 16, num_heads: 2}"}
SMOKE_BERT = {"--dataset": "tweets", "--model-args": "{pretrained: false, hidden: 32, layers: 2, heads: 2}"}
SMOKE_BERT_STUDENT = {**SMOKE_BERT, "--keep-layers": "1"}  # one of the smoke BERT's two layers


@dataclass(frozen=True)
class Job:
    """One job of the chain; its checkpoint is MODELS_DIR/NAME.pth (clos-convert: NAME_clos_mM.pth; prune: its
    --output and OUTPUT_kd.pth)."""

    name: str  # job name and run name
    command: str  # the main.py subcommand
    about: str  # what it does, for the batch script's comment
    recipe: str = ""  # training: the shipped config distillation_lab/configs/RECIPE.yaml
    args: tuple = ()  # more arguments ({models} = the models directory)
    after: tuple = ()  # jobs it waits for (afterok); a distill job's teacher is the first
    script: str = ""  # its batch script slurm/SCRIPT.slurm ("" for none: the demo)
    time: str = "16:00:00"
    cpus: int = 8
    mem_gb: int = 32
    gpus: int = 1
    smoke: dict = field(default_factory=dict)  # smoke-preset flags of this job beyond SMOKE
    report: tuple = ()  # (family, key of report.json) its run fills

    @property
    def trains(self) -> bool:
        """Whether the job is a run of the training loop (resumable: it saves on a stop signal)."""
        return self.command in TRAINING_COMMANDS

    @property
    def teacher(self) -> str:
        """The job whose checkpoint a distill job learns from ("" for others)."""
        return self.after[0] if self.command == "distill" else ""

    def argv(self, models: str = MODELS_DIR) -> list[str]:
        """The main.py arguments of the job."""
        argv = [self.command]
        if self.recipe:
            argv += ["--config", f"distillation_lab/configs/{self.recipe}.yaml"]
        if self.teacher:
            argv += ["--teacher-checkpoint", f"{models}/{self.teacher}.pth"]
        argv += [a.format(models=models) for a in self.args]
        return argv + (["--resume"] if self.trains else [])

    def smoke_argv(self) -> list[str]:
        """The flags the smoke preset adds (later flags win over the job's own)."""
        flags = {**SMOKE["training" if self.trains else self.command], **self.smoke}
        return [part for flag, value in flags.items() for part in ([flag] if value is None else [flag, value])]

    def required(self) -> list[str]:
        """Checkpoints of MODELS_DIR the job cannot run without: the dependency it reads (a distill job's
        teacher, the model a conversion starts from, the model a student is initialised from); a baseline
        otherwise only waits for its teacher's job."""
        reads = self.command in ("distill", "clos-convert", "prune") or "--init-checkpoint" in self.args
        return [f"{dep}.pth" for dep in self.after[:1]] if reads else []

    def staged(self) -> list[str]:
        """Its own checkpoints, if any, to resume from (a resumed run ends on its best)."""
        return [f"{self.name}.pth", f"{self.name}_last.pth"] if self.trains else []


CHAIN = (
    Job("cnn_teacher", "train-teacher", "ResNet-18 teacher on CIFAR-10, 300 epochs (lab plan: 24 h).",
        recipe="cnn_teacher", script="train_cnn_teacher", time="24:00:00", report=("cnn", "teacher_accuracy")),
    Job("vit_teacher", "train-teacher", "ViT-Tiny teacher on CIFAR-10, 100 epochs (lab plan: 24 h).",
        recipe="vit_teacher", script="train_vit_teacher", time="24:00:00", smoke=SMOKE_VIT,
        report=("vit", "teacher_accuracy")),
    Job("tweet_bert", "train-teacher", "The pretrained MiniLM-L6 BERT fine-tuned as a 3-way classifier on the real "
        "tweets (both ship in packages: no download), the original model of tweet_bert_clos.",
        recipe="tweet_bert", script="train_tweet_bert", time="02:00:00", smoke=SMOKE_BERT,
        report=("text", "teacher_accuracy")),
    Job("cnn_student", "train-student", "ResNet-8 student baseline (no KD) on CIFAR-10, 200 epochs.",
        recipe="cnn_student", after=("cnn_teacher",), script="train_cnn_student_baseline",
        report=("cnn", "student_accuracy_without_kd")),
    Job("cnn_student_kd", "distill", "ResNet-18 -> ResNet-8 distillation on CIFAR-10, 200 epochs, alpha 0.5, T 4.",
        recipe="distill_cnn", after=("cnn_teacher",), script="distill_cnn", report=("cnn", "student_accuracy_with_kd")),
    Job("vit_student", "train-student", "6-layer ViT student baseline (no KD) on CIFAR-10, 150 epochs.",
        recipe="vit_student", after=("vit_teacher",), script="train_vit_student_baseline", smoke=SMOKE_VIT,
        report=("vit", "student_accuracy_without_kd")),
    Job("vit_student_kd", "distill", "ViT-Tiny -> 6-layer ViT distillation on CIFAR-10, 150 epochs, alpha 0.5, T 4.",
        recipe="distill_vit", after=("vit_teacher",), script="distill_vit", smoke=SMOKE_VIT,
        report=("vit", "student_accuracy_with_kd")),
    Job("text_student", "train-student", "3-layer DistilBERT-style student of the tweet BERT (its layers 0, 2, 4, "
        "initialised from its weights) trained on the labels alone: the baseline of text_student_kd.",
        recipe="text_student", args=("--init-checkpoint", "{models}/tweet_bert.pth"), after=("tweet_bert",),
        script="train_text_student_baseline", time="02:00:00", smoke=SMOKE_BERT_STUDENT,
        report=("text", "student_accuracy_without_kd")),
    Job("text_student_kd", "distill", "The 3-layer student distilled from the tweet BERT: logits (0.5 CE + 0.5 T^2 "
        "KL, T 4) and sentence embeddings (cosine).",
        recipe="distill_text", args=("--init-checkpoint", "{models}/tweet_bert.pth"), after=("tweet_bert",),
        script="distill_text", time="02:00:00", smoke=SMOKE_BERT_STUDENT, report=("text", "student_accuracy_with_kd")),
    Job("vit_teacher_clos", "clos-convert", "Replace the ViT-Tiny teacher's attention projections and MLP layers by "
        "Clos layers (m = 4), then fine-tune with KD from the original for 10 epochs.",
        args=("--checkpoint", "{models}/vit_teacher.pth", "--multiplier", "4", "--finetune-epochs", "10", "--overwrite",
              "--layers", "vit.blocks.*.attn.qkv,vit.blocks.*.attn.proj,vit.blocks.*.mlp.fc1,vit.blocks.*.mlp.fc2"),
        after=("vit_teacher",), script="clos_convert_vit", time="08:00:00"),
    Job("tweet_bert_clos", "clos-convert", "Replace the tweet BERT's attention projections and MLP layers (36 linear "
        "layers) by Clos layers (m = 4; the default least-squares fit on 4,096 calibration tweets), then fine-tune "
        "with KD from the original for one epoch.",
        args=("--checkpoint", "{models}/tweet_bert.pth", "--multiplier", "4", "--finetune-epochs", "1", "--finetune-lr", "1e-4",
              "--overwrite",
              "--layers", "*.attention.*,*.intermediate.dense,*.layer.*.output.dense"),
        after=("tweet_bert",), script="clos_convert_bert", time="02:00:00"),
    Job("cnn_teacher_pruned", "prune", "Prune the ResNet-18 teacher structurally (channels, l2 importance, widths in "
        "multiples of 8) to the ResNet-8 student's 4,903,242 parameters, then fine-tune it for 30 epochs distilling "
        "from the unpruned teacher.",
        args=("--checkpoint", "{models}/cnn_teacher.pth", "--target-parameters", "4903242", "--finetune-epochs", "30",
              "--output", "{models}/cnn_teacher_pruned.pth", "--overwrite"),
        after=("cnn_teacher",), script="prune_cnn", time="08:00:00", smoke={"--target-parameters": "2x"}),
    Job("vit_teacher_pruned", "prune", "Prune the ViT-Tiny teacher's MLP hidden units and whole attention heads to 2x "
        "fewer MACs, then fine-tune it for 30 epochs distilling from the unpruned teacher.",
        args=("--checkpoint", "{models}/vit_teacher.pth", "--target-macs", "2x", "--finetune-epochs", "30",
              "--output", "{models}/vit_teacher_pruned.pth", "--overwrite"),
        after=("vit_teacher",), script="prune_vit", time="08:00:00"),
    Job("report", "report", "Re-evaluate every checkpoint in models_saved/ and write report.json (+ details, .md, "
        ".png) at the repository root.", args=("--models-dir", "{models}", "--output", "report.json"),
        after=("cnn_teacher", "vit_teacher", "cnn_student", "cnn_student_kd", "vit_student", "vit_student_kd",
               "text_student", "text_student_kd", "vit_teacher_clos", "tweet_bert_clos", "cnn_teacher_pruned", "vit_teacher_pruned"), script="report",
        time="01:00:00"),
)

# The embedded-data demo of `python main.py pipeline` (CPU, minutes): the cnn family of the chain.
DEMO = (
    Job("cnn_teacher", "train-teacher", "demo teacher", recipe="demo_teacher", report=("cnn", "teacher_accuracy")),
    Job("cnn_student", "train-student", "demo student baseline", recipe="demo_student", after=("cnn_teacher",),
        report=("cnn", "student_accuracy_without_kd")),
    Job("cnn_student_kd", "distill", "demo distilled student", recipe="demo_distill", after=("cnn_teacher",),
        report=("cnn", "student_accuracy_with_kd")),
)


def check_order(jobs: tuple) -> None:
    """Every job comes after the jobs it waits for (the table is in submission order)."""
    seen: set = set()
    for job in jobs:
        missing = [dep for dep in job.after if dep not in seen]
        assert not missing, f"job {job.name} waits for {missing}, which come later or not at all"
        seen.add(job.name)


def report_runs(jobs: tuple = CHAIN) -> dict[tuple, str]:
    """(family, report key) -> the run name the table writes for it."""
    return {job.report: job.name for job in jobs if job.report}


# ------------------------------------------------------------------ rendering (pure functions)
def shell_lines(head: str, words: list[str], tail: str = "", width: int = 110) -> str:
    """`head` and the quoted `words` (a flag stays with its value) in lines of at most about `width`
    characters, continued with backslashes, then `tail`."""
    groups: list[str] = []
    for word in words:
        if groups and groups[-1].startswith("--") and " " not in groups[-1] and not word.startswith("--"):
            groups[-1] += " " + shlex.quote(word)
        else:
            groups.append(shlex.quote(word))
    lines, line = [], head
    for group in groups:
        if len(line) + 1 + len(group) > width - 2 and line.strip():
            lines.append(line + " \\")
            line = "    " + group
        else:
            line = f"{line} {group}" if line and not line.endswith("(") else line + group
    return "\n".join(lines + [line + tail])


def stage_lines(job: Job) -> list[str]:
    """The lines that copy a job's inputs into its scratch copy."""
    if job.command == "report":
        return ["dl_stage_best_checkpoints"]
    return ([f"dl_require {' '.join(job.required())}"] if job.required() else []) + \
        ([f"dl_stage {' '.join(job.staged())}"] if job.staged() else [])


def render_script(job: Job) -> str:
    """The batch script slurm/SCRIPT.slurm of a job."""
    header = [f"--job-name={job.name}", f"--partition={DEFAULT_PARTITION}", f"--gres=gpu:{job.gpus}",
              f"--cpus-per-task={job.cpus}", f"--mem={job.mem_gb}G", f"--time={job.time}",
              "--output=slurm/logs/%x-%j.out"]
    if job.trains:  # save 5 minutes before the limit, requeue, resume; one log for all attempts
        header += ["--signal=B:USR1@300", "--requeue", "--open-mode=append"]
    about = job.about + (f" Runs after {', '.join(job.after)} in the chain." if job.after else "")
    lines = ["#!/bin/bash -l", RENDERED_NOTE, *(f"#SBATCH {h}" for h in header),
             *textwrap.wrap(about, 100, initial_indent="# ", subsequent_indent="# "),
             f"# Submit from the repository root: bash submit_best_gpu.sh slurm/{job.script}.slurm",
             f"# Locally (no SLURM): bash slurm/{job.script}.slurm",
             "# shellcheck disable=SC2034  # read by dl_run in common.sh when DL_SMOKE=1",
             shell_lines("DL_SMOKE_ARGS=(", job.smoke_argv(), ")"),
             'source "${DL_REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"',
             *stage_lines(job),
             shell_lines("dl_run", job.argv())]
    return "\n".join(lines) + "\n"


SUBMIT_CHAIN_HEAD = '''#!/usr/bin/env bash
''' + RENDERED_NOTE + '''
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

'''


def render_submit_chain(jobs: tuple = CHAIN) -> str:
    """slurm/submit_chain.sh: submit every job of the table in order, each after its dependencies."""
    check_order(jobs)
    lines = []
    for job in jobs:
        deps = ":".join(f"${dep}" for dep in job.after)
        after = f' $(after "{deps}")' if deps else ""
        lines.append(f'    {job.name}=$(submit slurm/{job.script}.slurm{after} "$@")')
    submitted = textwrap.wrap(" ".join(f"{job.name}=${job.name}" for job in jobs), 90)
    echo = 'echo "submitted: ' + '" \\\n     "'.join(submitted) + '"'
    return (SUBMIT_CHAIN_HEAD + "# shellcheck disable=SC2046  # after() yields two words on purpose\n{\n"
            + "\n".join(lines) + "\n}\n" + echo + "\n")


def rendered_files(jobs: tuple = CHAIN) -> dict[Path, str]:
    """Every file the table renders, by path."""
    files = {ROOT / "slurm" / f"{job.script}.slurm": render_script(job) for job in jobs if job.script}
    files[ROOT / "slurm" / "submit_chain.sh"] = render_submit_chain(jobs)
    return files


def main(argv: list[str] | None = None) -> int:
    """--write: render the batch scripts from the table; --check: fail if a committed one differs."""
    parser = argparse.ArgumentParser(prog="python -m distillation_lab.chain", description=main.__doc__)
    parser.add_argument("--write", action="store_true", help="write the files that differ (default: --check)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file differs from the table")
    write = parser.parse_args(argv).write
    files = rendered_files()
    stale = [path for path, text in files.items() if not path.exists() or path.read_text() != text]
    if write:
        for path in stale:
            path.write_text(files[path])
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    for path in stale:
        print(f"{path.relative_to(ROOT)} differs from the job table: run python -m distillation_lab.chain --write",
              file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
