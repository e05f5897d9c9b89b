"""Pruning: targets and widths reached, smaller and faster-to-compute models that reload to identical
outputs, zeros that stay zero through fine-tuning, gradual schedules, and bad input refused."""
import hashlib
import re

import pytest
import torch

from distillation_lab.main import main
from pruning_lab.checkpoint import build_model, load_checkpoint, save_checkpoint
from pruning_lab.inference import count_flops, count_parameters
from pruning_lab.models import create_model
from pruning_lab.prune import prune_structured, prune_unstructured, ratio_for_target, shape_changes, sparsity
from pruning_lab.surgery import apply_surgery

DATA = ["--dataset", "mnist_embedded", "--train-subset", "512", "--val-size", "200", "--batch-size", "64",
        "--no-progress"]


def fingerprint(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A ResNet-18 (width 8) and a ViT (2 blocks, 4 heads) trained briefly on the embedded digits."""
    out = tmp_path_factory.mktemp("models")
    assert main(["train-teacher", "--model", "resnet18", "--model-args", "{width: 8}", *DATA, "--epochs", "3",
                 "--optimizer", "adam", "--lr", "2e-3", "--scheduler", "cosine", "--out-dir", str(out),
                 "--name", "cnn"]) == 0
    assert main(["train-teacher", "--model", "vit_student", "--model-args", "{depth: 2, embed_dim: 32, num_heads: 4}",
                 *DATA, "--epochs", "1", "--optimizer", "adamw", "--lr", "1e-3", "--scheduler", "cosine",
                 "--out-dir", str(out), "--name", "vit"]) == 0
    return out


def reloaded_equal(path, shape):
    """The checkpoint rebuilt from its record gives the same logits as the model it was saved from."""
    ckpt = load_checkpoint(path)
    a, b = build_model(ckpt), build_model(ckpt)
    x = torch.randn(3, *shape)
    return a.eval()(x)[0], b.eval()(x)[0]


@pytest.mark.parametrize("name, kwargs, shape", [
    ("resnet18", {"width": 16}, (3, 32, 32)),
    ("vit_tiny", {"depth": 2, "embed_dim": 48, "num_heads": 3}, (3, 32, 32)),
    ("mnist_mlp", {"hidden": [64, 32]}, (1, 28, 28)),
])
def test_structured_pruning_shrinks_the_model_and_replays_from_its_record(name, kwargs, shape):
    torch.manual_seed(0)
    model = create_model(name, 10, shape[0], shape[1], **kwargs)
    unpruned = create_model(name, 10, shape[0], shape[1], **kwargs)
    unpruned.load_state_dict(model.state_dict())
    x = torch.randn(4, *shape)
    target = count_parameters(model) // 3
    ratio = ratio_for_target(model, count_parameters, target, x, round_to=8)
    prune_structured(model, ratio, x, "l1", round_to=8)
    assert count_parameters(model) <= target < count_parameters(unpruned)
    assert count_flops(model, shape) < count_flops(unpruned, shape)
    assert model.eval()(x)[0].shape == (4, 10)  # the skip connections and heads still line up
    changes = shape_changes(model, unpruned)
    widths = [r["attrs"][k] for r in changes.values() for k in ("out_channels", "out_features") if k in r["attrs"]]
    assert widths and all(w % 8 == 0 or w == 10 for w in widths)  # multiples of round_to (the classifier keeps 10)
    rebuilt = apply_surgery(create_model(name, 10, shape[0], shape[1], **kwargs), [{"kind": "prune", "modules": changes}])
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.eval()(x)[0], model(x)[0])
    if name == "vit_tiny":
        attn = model.vit.blocks[0].attn
        assert attn.num_heads < 3 and model.vit.embed_dim == 48  # whole heads gone, the residual width kept
        assert model.vit.blocks[0].mlp.fc1.out_features < 192


@pytest.mark.e2e
def test_prune_to_a_parameter_target_then_kd_fine_tuning_learns(trained, capsys):
    teacher = trained / "cnn.pth"
    before = count_parameters(build_model(load_checkpoint(teacher)))
    assert main(["prune", "--checkpoint", str(teacher), "--target-parameters", "4x", "--importance", "taylor",
                 "--calibration-examples", "128", "--finetune-epochs", "2", "--device", "cpu"]) == 0
    ckpt = load_checkpoint(trained / "cnn_pruned_p4x.pth")
    model = build_model(ckpt)
    assert count_parameters(model) <= before / 4
    assert ckpt["surgery"][0]["kind"] == "prune" and ckpt["surgery"][0]["importance"] == "taylor"
    assert all(w % 8 == 0 for w in model.feature_widths)
    summary = ckpt["prune"]
    tuned = load_checkpoint(trained / "cnn_pruned_p4x_kd.pth")
    assert tuned["surgery"] == ckpt["surgery"] and tuned["teacher"]["checkpoint"] == str(teacher)
    assert tuned["test"]["acc"] > summary["test_accuracy_pruned"] + 0.05  # fine-tuning recovers accuracy
    a, b = reloaded_equal(trained / "cnn_pruned_p4x_kd.pth", (1, 28, 28))
    assert torch.equal(a, b)
    assert main(["evaluate", str(trained / "cnn_pruned_p4x_kd.pth")]) == 0
    assert re.search(rf"^parameters +{count_parameters(model)}$", capsys.readouterr().out, re.M)


def test_vit_heads_and_mlp_units_pruned_by_macs_target(trained):
    vit = trained / "vit.pth"
    assert main(["prune", "--checkpoint", str(vit), "--target-macs", "2x", "--device", "cpu"]) == 0
    ckpt = load_checkpoint(trained / "vit_pruned_macs2x.pth")
    model = build_model(ckpt)
    assert ckpt["prune"]["macs_after"] <= ckpt["prune"]["macs_before"] / 2
    assert model.vit.blocks[0].attn.num_heads < 4 and model.vit.embed_dim == 32
    assert model(torch.randn(2, 1, 28, 28))[0].shape == (2, 10)


def test_unstructured_sparsity_is_reached_kept_through_fine_tuning_and_stored_smaller(trained):
    teacher = trained / "cnn.pth"
    assert main(["prune", "--checkpoint", str(teacher), "--method", "unstructured", "--amount", "0.8", "--steps", "2",
                 "--finetune-epochs", "2", "--no-kd", "--device", "cpu"]) == 0
    pruned, tuned = load_checkpoint(trained / "cnn_sparse80.pth"), load_checkpoint(trained / "cnn_sparse80_ft.pth")
    names = pruned["surgery"][0]["weights"]
    assert set(pruned["surgery"][0]["layer_sparsity"]) == set(names)  # per layer, as global pruning left it
    assert abs(sparsity(build_model(pruned), names) - 0.8) < 1e-3
    assert abs(sparsity(build_model(tuned), names) - 0.8) < 1e-3  # the zeros stay zero while fine-tuning
    assert [s["sparsity"] for s in pruned["prune"]["schedule"]] == pytest.approx([1 - 0.2 ** 0.5, 0.8], abs=1e-3)
    assert (trained / "cnn_sparse80_steps" / "step1_ft.pth").exists()  # gradual: pruned, tuned, pruned again
    assert (trained / "cnn_sparse80.pth").stat().st_size < 0.5 * teacher.stat().st_size
    assert tuned["teacher"] is None and count_parameters(build_model(tuned)) == count_parameters(build_model(pruned))


def test_bn_scale_importance_and_gradual_structured_steps(trained):
    assert main(["prune", "--checkpoint", str(trained / "cnn.pth"), "--amount", "0.5", "--importance", "bn-scale",
                 "--steps", "2", "--round-to", "1", "--device", "cpu", "--output", str(trained / "bn.pth")]) == 0
    assert main(["prune", "--checkpoint", str(trained / "cnn.pth"), "--amount", "0.5", "--round-to", "1",
                 "--device", "cpu", "--output", str(trained / "one_shot.pth")]) == 0
    one_shot = load_checkpoint(trained / "one_shot.pth")
    assert build_model(one_shot).feature_widths == [4, 8, 16, 32]  # half of 8, 16, 32, 64
    first, second = load_checkpoint(trained / "bn.pth")["prune"]["schedule"]
    assert first["parameters"] > second["parameters"]  # two steps end where one shot would
    assert second["parameters"] <= one_shot["prune"]["parameters_after"] < 1.05 * second["parameters"]
    for name in ("bn.pth", "one_shot.pth"):
        (trained / name).unlink()


@pytest.mark.parametrize("flags, message", [
    (["--amount", "1.0"], "--amount must be in [0, 1)"),
    (["--amount", "-0.1"], "--amount must be in [0, 1)"),
    ([], "give exactly one of --amount, --target-parameters, --target-macs"),
    (["--amount", "0.5", "--target-macs", "2x"], "give exactly one of"),
    (["--method", "unstructured", "--target-parameters", "1000"], "unstructured pruning takes --amount"),
    (["--method", "unstructured", "--amount", "0.5", "--importance", "l1"], "--importance is for --method structured"),
    (["--target-parameters", "0.5x"], "--target-parameters must be a count"),
    (["--target-parameters", "10"], "cannot bring this model to 10: the smallest it reaches"),
    (["--amount", "0.5", "--no-kd", "--teacher-checkpoint", "x.pth"], "--no-kd fine-tunes without a teacher"),
    (["--amount", "0.5", "--steps", "0"], "--steps must be >= 1"),
    (["--amount", "0.5", "--alpha", "0.3"], "the loss options set up the fine-tuning, but --finetune-epochs is 0"),
    (["--amount", "0.5", "--no-kd"], "--no-kd sets up the fine-tuning, but --finetune-epochs is 0"),
])
def test_bad_prune_options_are_one_line_errors_and_write_nothing(trained, capsys, flags, message):
    before = fingerprint(trained)
    assert main(["prune", "--checkpoint", str(trained / "cnn.pth"), "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert fingerprint(trained) == before


def test_a_method_that_does_not_apply_and_a_record_naming_missing_layers_are_refused(trained, tmp_path, capsys):
    assert main(["prune", "--checkpoint", str(trained / "vit.pth"), "--amount", "0.5", "--importance", "bn-scale",
                 "--output", str(tmp_path / "v.pth")]) == 2
    assert "has no batch norm: use l1, l2 or taylor" in capsys.readouterr().err
    assert not (tmp_path / "v.pth").exists()
    ckpt = load_checkpoint(trained / "cnn.pth")
    crafted = {**{k: v for k, v in ckpt.items() if k not in ("format", "version")},
               "surgery": [{"kind": "prune", "modules": {"stages.9.conv": {"attrs": {}, "shapes": {}}}}]}
    save_checkpoint(crafted, tmp_path / "crafted.pth")
    assert main(["evaluate", str(tmp_path / "crafted.pth")]) == 2
    assert "names a layer 'stages.9.conv' that the model does not have" in capsys.readouterr().err
    # An existing output is not replaced without --overwrite.
    target = trained / "cnn_pruned50.pth"
    target.write_bytes(b"keep me")
    assert main(["prune", "--checkpoint", str(trained / "cnn.pth"), "--amount", "0.5"]) == 2
    assert "exists: add --overwrite" in capsys.readouterr().err and target.read_bytes() == b"keep me"
    target.unlink()


def test_unstructured_pruning_of_any_model_even_with_a_shared_layer():
    torch.manual_seed(0)
    model = create_model("resnet8", 10, 3, 32, width=8)
    names = prune_unstructured(model, 0.6)
    assert abs(sparsity(model, names) - 0.6) < 1e-3 and not any("orig" in k for k in model.state_dict())
    shared = torch.nn.Linear(16, 16)
    net = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)  # one layer used twice
    names = prune_unstructured(net, 0.5)
    assert names == ["0.weight"] and (shared.weight == 0).float().mean() == 0.5
    assert net[2].weight is shared.weight and net(torch.randn(2, 16)).shape == (2, 16)


def test_bert_heads_and_mlp_units_pruned_with_transformers_tools_and_replayed():
    torch.manual_seed(0)
    kwargs = dict(pretrained=False, hidden=32, layers=2, heads=4)
    model, unpruned = create_model("minilm_bert", 3, 1, 16, **kwargs), create_model("minilm_bert", 3, 1, 16, **kwargs)
    unpruned.load_state_dict(model.state_dict())
    x = model.example_input(3, "cpu")
    x[:, 9:] = 0  # padding
    prune_structured(model, 0.5, x, "l2", round_to=8)
    layer = model.hf.bert.encoder.layer[0]
    assert layer.attention.self.num_attention_heads == 2 and layer.attention.self.query.out_features == 16
    assert layer.intermediate.dense.out_features == 64 and layer.output.dense.in_features == 64
    assert count_flops(model, (1, 16, 16)) < 0.6 * count_flops(unpruned, (1, 16, 16))
    rebuilt = apply_surgery(create_model("minilm_bert", 3, 1, 16, **kwargs),
                            [{"kind": "prune", "modules": shape_changes(model, unpruned)}])
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.eval()(x)[0], model.eval()(x)[0])


def test_latency_of_a_slow_model_takes_one_warm_up_and_the_minimum_repeats():
    """A forward slower than the time budget allows: one warm-up forward and `min_repeats` timed ones, whose median
    is the latency; a fast model gets all its warm-ups and repeats."""
    import time

    from pruning_lab.inference import measure_latency

    class Sleeper(torch.nn.Module):
        def __init__(self, seconds: float):
            super().__init__()
            self.seconds, self.calls = seconds, 0

        def forward(self, x):
            self.calls += 1
            time.sleep(self.seconds)
            return x

    slow, fast = Sleeper(0.1), Sleeper(0.0)
    assert 95 < measure_latency(slow, (1, 4, 4), max_seconds=0.2) < 200 and slow.calls == 1 + 3
    measure_latency(fast, (1, 4, 4), max_seconds=0.2)
    assert fast.calls == 3 + 20
