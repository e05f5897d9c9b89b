"""A 3-layer DistilBERT-style student of the tweet BERT: alone, distilled from logits, and from logits +
sentence embeddings.

    python -m benchmarks.text_students [--seed 0] [--out-dir models_saved/text]

The teacher is the pretrained MiniLM-L6 BERT fine-tuned on the real tweets (distillation_lab/configs/
tweet_bert.yaml: 4,000 training tweets, 2 epochs). Each student keeps the teacher's layers 0, 2 and 4
(`--init-checkpoint` + `--keep-layers 0 2 4`, initialised from the fine-tuned teacher's weights, as
DistilBERT took every second layer of BERT) and is trained with the teacher's recipe: on the labels
alone; with 0.5 CE + 0.5 T^2 KL (T = 4) on the logits; and with a cosine term (weight 1) between the
student's and the teacher's mean-pooled last hidden states (the sentence embeddings) added.

With the key-value bottleneck (`--bottleneck`, unless --no-bottleneck): the teacher's classifier is
replaced by a bottleneck over its frozen encoder (keys fitted to its outputs on the training tweets,
values trained with the same recipe at learning rate --bottleneck-lr), and each student's likewise
over its own trained encoder, its values trained the way that student was: on the labels (the student
alone), or distilled from the bottleneck teacher's logits (both KD students; the encoder is frozen, so
a hidden-state term could not change anything). The logit-distilled student's bottleneck is also
distilled with the KL term alone (`{kd: {weight: 1.0}}`), and with its keys copied from the bottleneck
teacher's (`keys_from: teacher`, both encoders are 384 wide) under either loss. Prints test accuracy, macro F1, MCC, parameters and
batch-1 latency (CPU) of the teacher and the students.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.results import Results, add_results_flag
from distillation_lab.main import main
from pruning_lab.inference import evaluate_checkpoint

RECIPE = "distillation_lab/configs/tweet_bert.yaml"
KD = "{ce: {weight: 0.5}, kd: {weight: 0.5, temperature: 4.0}}"
BOTTLENECK = "{codebooks: 8, keys: 512}"
KL_ONLY = "{kd: {weight: 1.0, temperature: 4.0}}"
KD_HIDDEN = "{ce: {weight: 0.5}, kd: {weight: 0.5, temperature: 4.0}, feature: {weight: 1.0, kind: cosine}}"


def run(argv: list[str]) -> None:
    """One CLI command; stop on failure."""
    print("\n$ python main.py " + " ".join(argv), flush=True)
    if main(argv) != 0:
        raise SystemExit(f"failed: {' '.join(argv)}")


def bottleneck_runs(common: list[str], out: Path, runs: dict, args: argparse.Namespace) -> dict:
    """The teacher and each student with a key-value bottleneck over their frozen, trained encoders; the
    logit-distilled student also with the KL-only loss and with its keys copied from the teacher's."""
    kvb = ["--bottleneck", args.bottleneck, "--lr", args.bottleneck_lr]
    teacher = "tweet_bert_kvb"
    run(["train-teacher", *common, *kvb, "--init-checkpoint", str(out / "tweet_bert.pth"), "--name", teacher])
    made = {"teacher + bottleneck": teacher}
    for label, name in list(runs.items())[1:]:
        start = [*common, *kvb, "--init-checkpoint", str(out / f"{name}.pth"), "--seed", str(args.seed)]
        kvb_name = name.replace("_seed", "_kvb_seed")
        if "KD" in label:
            run(["distill", *start, "--teacher-checkpoint", str(out / f"{teacher}.pth"), "--loss", KD,
                 "--name", kvb_name])
        else:
            run(["train-student", *start, "--name", kvb_name])
        made[f"{label} + bottleneck"] = kvb_name
    kd_student = str(out / f"{runs['student, KD on logits']}.pth")
    variants = {"KL only": (args.bottleneck, KL_ONLY, "_klonly"),
                "keys from the teacher": (with_teacher_keys(args.bottleneck), KD, "_tkeys"),
                "keys from the teacher, KL only": (with_teacher_keys(args.bottleneck), KL_ONLY, "_tkeys_klonly")}
    for label, (options, loss, suffix) in variants.items():
        name = f"student3_kd_kvb{suffix}_seed{args.seed}"
        run(["distill", *common, "--bottleneck", options, "--lr", args.bottleneck_lr, "--init-checkpoint", kd_student,
             "--seed", str(args.seed), "--teacher-checkpoint", str(out / f"{teacher}.pth"), "--loss", loss,
             "--name", name])
        made[f"student, KD on logits + bottleneck, {label}"] = name
    return made


def with_teacher_keys(options: str) -> str:
    """The bottleneck options (YAML) with keys_from: teacher added."""
    return "{" + options.strip().strip("{}") + ", keys_from: teacher}"


def main_(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="models_saved/text")
    parser.add_argument("--bottleneck", default=BOTTLENECK, help="the bottleneck's options (YAML)")
    parser.add_argument("--bottleneck-lr", default="1e-2", help="learning rate of the bottleneck's values")
    parser.add_argument("--no-bottleneck", action="store_true", help="only the runs without the bottleneck")
    add_results_flag(parser)
    args = parser.parse_args(argv)
    result = Results("text_students", argv)
    out = Path(args.out_dir)
    common = ["--config", RECIPE, "--out-dir", str(out), "--resume", "--no-progress"]
    run(["train-teacher", *common, "--name", "tweet_bert"])
    teacher = str(out / "tweet_bert.pth")
    student = [*common, "--init-checkpoint", teacher, "--keep-layers", "0", "2", "4", "--seed", str(args.seed)]
    runs = {"teacher (6 layers)": "tweet_bert", "student alone": f"student3_seed{args.seed}",
            "student, KD on logits": f"student3_kd_seed{args.seed}",
            "student, KD on logits + sentence embeddings": f"student3_kd_hidden_seed{args.seed}"}
    run(["train-student", *student, "--name", runs["student alone"]])
    run(["distill", *student, "--teacher-checkpoint", teacher, "--loss", KD, "--name", runs["student, KD on logits"]])
    run(["distill", *student, "--teacher-checkpoint", teacher, "--loss", KD_HIDDEN,
         "--name", runs["student, KD on logits + sentence embeddings"]])
    if not args.no_bottleneck:
        runs.update(bottleneck_runs(common, out, runs, args))
    result("\n| model | test accuracy | macro F1 | MCC | parameters | latency ms (batch 1) |")
    result("|---|---|---|---|---|---|")
    for label, name in runs.items():
        card = evaluate_checkpoint(str(out / f"{name}.pth"), device="cpu")
        result(f"| {label} | {card['test_accuracy']:.4f} | {card['test_f1_macro']:.4f} | {card['test_mcc']:.4f} | "
               f"{card['parameters']:,} | {card['latency_ms_batch1']:.1f} |")
    result.finish(args.write_results)


if __name__ == "__main__":
    main_()
