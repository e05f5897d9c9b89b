"""The discrete key-value bottleneck: keys fitted then frozen, values trained, rebuilt from checkpoints."""
import pytest
import torch

from distillation_lab.main import main
from pruning_lab.checkpoint import build_model, load_checkpoint
from pruning_lab.models import create_model
from pruning_lab.models.bottleneck import KeyValueBottleneck, add_bottleneck, find_bottleneck, init_keys

TINY = ["--dataset", "mnist_embedded", "--model-args", "{width: 4}", "--epochs", "2", "--train-subset", "512",
        "--val-size", "100", "--batch-size", "64", "--optimizer", "adam", "--lr", "1e-2", "--no-progress"]


def test_keys_are_fitted_then_frozen_while_the_values_train_on_a_frozen_encoder(tmp_path):
    out = tmp_path / "models"
    assert main(["train-teacher", *TINY, "--model", "resnet8", "--out-dir", str(out), "--name", "encoder"]) == 0
    encoder = load_checkpoint(out / "encoder.pth")
    with_bottleneck = [*TINY, "--init-checkpoint", str(out / "encoder.pth"), "--bottleneck", "{codebooks: 8, keys: 16}",
                       "--out-dir", str(out), "--name", "kvb"]
    assert main(["train-student", *with_bottleneck, "--epochs", "1", "--max-steps-per-epoch", "1"]) == 0
    first = load_checkpoint(out / "kvb.pth")
    record = first["surgery"][0]
    assert {k: record[k] for k in ("kind", "layer", "config")} == {"kind": "bottleneck", "layer": "fc", "config": {
        "in_features": 32, "num_classes": 10, "codebooks": 8, "keys": 16, "keys_from": "fit"}}
    fitted = record["keys_fitted"]  # 20 examples per key, every key distinct and in use
    assert fitted["examples"] == 320 and fitted["distinct"] == [16] * 8 and min(fitted["used"]) >= 12, fitted
    assert main(["train-student", *with_bottleneck, "--resume", "--resume-changes"]) == 0  # one more epoch
    last = load_checkpoint(out / "kvb_last.pth")
    keys = "fc.quantizer._codebook.embed"
    assert torch.equal(first["state_dict"][keys], last["state_dict"][keys])  # frozen once fitted
    assert not torch.equal(first["state_dict"]["fc.values"], last["state_dict"]["fc.values"])  # trained
    for name, tensor in encoder["state_dict"].items():  # the encoder, batch-norm statistics included, is frozen
        if not name.startswith("fc."):
            assert torch.equal(tensor, last["state_dict"][name]), name
    assert load_checkpoint(out / "kvb.pth")["test"]["acc"] > 0.3  # chance is 0.1
    model = build_model(load_checkpoint(out / "kvb.pth"))
    assert isinstance(model.fc, KeyValueBottleneck)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model.eval()(x)[0], build_model(load_checkpoint(out / "kvb.pth")).eval()(x)[0])
    assert main(["report", "--models-dir", str(out), "--device", "cpu"]) == 0  # never shown as a plain student
    rows = [line for line in (out / "report.md").read_text().splitlines() if "| kvb " in line]
    assert rows and all("without kd + key-value bottleneck" in line for line in rows), rows


def test_the_keys_are_fitted_once_and_only_the_selected_values_get_gradients():
    torch.manual_seed(0)
    model = create_model("mnist_mlp", 10, 1, 28, hidden=[32, 16])
    bottleneck = add_bottleneck(model, {"codebooks": 4, "keys": 8})
    batches = [(torch.randn(64, 1, 28, 28), torch.zeros(64, dtype=torch.long)) for _ in range(3)]
    before = bottleneck.quantizer._codebook.embed.clone()
    usage = init_keys(model, batches)
    fitted = bottleneck.quantizer._codebook.embed.clone()
    assert not torch.equal(before, fitted)  # k-means over the encoder outputs
    assert usage == {"keys": 8, "examples": 160, "distinct": [8] * 4, "used": usage["used"]}
    assert min(usage["used"]) >= 6
    model.train()
    logits, _ = model(batches[0][0][:1])
    logits.sum().backward()
    assert torch.equal(fitted, bottleneck.quantizer._codebook.embed)  # training mode does not move them
    touched = (bottleneck.values.grad.abs().sum(-1) > 0).sum()
    assert touched == 4  # one key per codebook for one input
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in model.named_parameters() if n.startswith("fc1"))
    assert find_bottleneck(model) is bottleneck


def test_bad_bottleneck_settings_are_one_line_errors(tmp_path, capsys):
    out = tmp_path / "models"
    for setting, message in (("{codebooks: 5}", "codebooks 5 must divide the encoder's output width 32"),
                             ("{books: 2}", "unknown bottleneck option(s) books"),
                             ("{keys: 0}", "codebooks and keys must be integers >= 1"),
                             ("{decay: 0.9}", "bottleneck decay no longer applies"),
                             ("{keys: 100000}", "bottleneck keys 100000: their k-means fit sees one encoder output per "
                                                "training example")):
        assert main(["train-student", *TINY, "--bottleneck", setting, "--out-dir", str(out), "--name", "b"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err
        assert not (out / "b.pth").exists()


def test_a_bert_with_the_bottleneck_trains_only_the_values_and_replays():
    from pruning_lab.surgery import apply_surgery

    torch.manual_seed(0)
    kwargs = dict(pretrained=False, hidden=32, layers=2, heads=2)
    model = create_model("minilm_bert", 3, 1, 16, **kwargs)
    add_bottleneck(model, {"codebooks": 4, "keys": 8})
    x = model.example_input(8, "cpu")
    init_keys(model, [(x, torch.zeros(8, dtype=torch.long))])
    model.train()
    model(x)[0].sum().backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["hf.classifier.values"]
    assert not model.hf.bert.encoder.layer[0].attention.self.dropout.training  # a frozen encoder: no dropout
    rebuilt = apply_surgery(create_model("minilm_bert", 3, 1, 16, **kwargs), model.surgery)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.eval()(x)[0], model.eval()(x)[0])


def test_keys_fitted_on_small_batches_stay_distinct_and_in_use():
    """The text bug: k-means on a first batch of 32 gave 512 keys 33 distinct values, the rest died at the first
    moving-average update. Fitted over many batches at once, every key is distinct and most are in use."""
    torch.manual_seed(0)
    model = create_model("mnist_mlp", 10, 1, 28, hidden=[64, 32])
    bottleneck = add_bottleneck(model, {"codebooks": 4, "keys": 64})
    centres = torch.randn(200, 1, 28, 28)  # clustered inputs, as real data are
    batches = [(centres[torch.randint(0, 200, (32,))] + 0.1 * torch.randn(32, 1, 28, 28),
                torch.zeros(32, dtype=torch.long)) for _ in range(60)]
    usage = init_keys(model, batches)
    assert usage["examples"] == 1280  # 20 per key, from 40 batches of 32
    assert usage["distinct"] == [64] * 4
    assert min(usage["used"]) > 32, usage  # most keys in use, not the 33 of 512 of the bug
    assert not torch.equal(bottleneck.quantizer._codebook.embed[0, 0], torch.zeros(16))


@pytest.mark.e2e
def test_evaluate_shows_how_many_keys_are_distinct_and_used(tmp_path, capsys):
    import json

    out = tmp_path / "models"
    assert main(["train-teacher", *TINY, "--model", "resnet8", "--epochs", "1", "--out-dir", str(out),
                 "--name", "encoder"]) == 0
    assert main(["train-student", *TINY, "--init-checkpoint", str(out / "encoder.pth"), "--epochs", "1",
                 "--bottleneck", "{codebooks: 4, keys: 8}", "--out-dir", str(out), "--name", "kvb"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out / "kvb.pth"), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["bottleneck_keys_per_codebook"] == 8 and card["bottleneck_distinct_keys"] == [8] * 4
    assert card["bottleneck_fit_examples"] == 160 and len(card["bottleneck_keys_used_in_fit"]) == 4
    assert all(1 <= n <= 8 for n in card["bottleneck_keys_used_on_test"])


@pytest.mark.e2e
def test_a_students_keys_start_from_its_teachers_and_kl_alone_trains_its_values(tmp_path, capsys):
    out = tmp_path / "models"
    assert main(["train-teacher", *TINY, "--model", "resnet8", "--epochs", "1", "--out-dir", str(out),
                 "--name", "encoder"]) == 0
    assert main(["train-student", *TINY, "--epochs", "1", "--init-checkpoint", str(out / "encoder.pth"),
                 "--bottleneck", "{codebooks: 8, keys: 16}", "--out-dir", str(out), "--name", "teacher"]) == 0
    student = ["distill", *TINY, "--epochs", "1", "--teacher", "resnet8", "--teacher-checkpoint", str(out / "teacher.pth"),
               "--init-checkpoint", str(out / "encoder.pth"), "--out-dir", str(out), "--loss", "{kd: {weight: 1.0}}"]
    assert main([*student, "--bottleneck", "{codebooks: 8, keys: 16, keys_from: teacher}", "--name", "kl_only"]) == 0
    teacher, kl_only = load_checkpoint(out / "teacher.pth"), load_checkpoint(out / "kl_only.pth")
    keys = "fc.quantizer._codebook.embed"
    assert torch.equal(teacher["state_dict"][keys], kl_only["state_dict"][keys])  # started from, and kept frozen
    assert kl_only["surgery"][0]["keys_fitted"]["distinct"] == [16] * 8
    assert set(kl_only["config"]["loss"]) == {"kd"}  # KL alone: the values learn from the teacher's soft targets
    assert not torch.equal(teacher["state_dict"]["fc.values"], kl_only["state_dict"]["fc.values"])
    capsys.readouterr()
    for setting, message in (("{codebooks: 8, keys: 8, keys_from: teacher}", "keys are [8, 16, 4]"),
                             ("{codebooks: 8, keys: 16, keys_from: tea}", "keys_from must be one of fit, teacher")):
        assert main([*student, "--bottleneck", setting, "--name", "bad"]) == 2
        assert message in capsys.readouterr().err
    assert main(["distill", *TINY, "--epochs", "1", "--teacher", "resnet8", "--teacher-checkpoint", str(out / "encoder.pth"),
                 "--init-checkpoint", str(out / "encoder.pth"), "--out-dir", str(out), "--name", "bad",
                 "--bottleneck", "{codebooks: 8, keys: 16, keys_from: teacher}"]) == 2
    assert "has no key-value bottleneck" in capsys.readouterr().err
    assert not (out / "bad.pth").exists()
