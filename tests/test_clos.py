"""Clos layers: sizes, full rank, shapes, errors, exact recovery, and clos-convert with replay on load."""
import pytest
import torch

from distillation_lab.main import main
from pruning_lab.clos import Clos, fit_clos
from pruning_lab.clos.fit import fit_to_dense, relative_error
from pruning_lab.errors import UserError
from pruning_lab.checkpoint import build_model, load_checkpoint


def dense_map(layer, size):
    with torch.no_grad():
        zero = torch.zeros(1, size)
        return (layer(torch.eye(size)) - layer(zero)).T, layer(zero)[0]


def test_parameter_counts_and_factors():
    c4, c2 = Clos(784, 784, 4), Clos(784, 784, 2)
    assert (c4.bin, c4.b1, c4.b2, c4.b3, c4.bout) == (28, 28, 112, 28, 28)
    assert sum(p.numel() for p in c4.parameters()) == 263_592
    assert sum(p.numel() for p in c2.parameters()) == 131_824
    assert (c4.w1.shape, c4.w2.shape, c4.w3.shape) == ((28, 28, 112), (28, 112, 28), (112, 28, 28))
    assert sum(p.numel() for p in torch.nn.Linear(784, 784).parameters()) == 615_440
    odd = Clos(784, 256, 2, bin_=16)
    assert (odd.bin, odd.b1, odd.bout, odd.b3) == (16, 49, 16, 16)


def test_map_has_full_rank():
    torch.manual_seed(0)
    weight, _ = dense_map(Clos(784, 784, 4), 784)
    assert torch.linalg.matrix_rank(weight.double()) == 784


def test_any_leading_dimensions():
    c = Clos(64, 48, 2)
    x = torch.randn(2, 3, 5, 64)
    flat = c(x.reshape(-1, 64)).reshape(2, 3, 5, 48)
    assert c(x).shape == (2, 3, 5, 48) and torch.allclose(c(x), flat, atol=1e-6)


def test_composed_weight_path_equals_the_stages_in_outputs_and_gradients():
    torch.manual_seed(0)
    clos = Clos(96, 40, 2)
    with torch.no_grad():
        for p in (clos.bias1, clos.bias2, clos.bias3):
            p.normal_()
    x = torch.randn(7, 3, 96)
    results = {}
    for path in ("stages", "composed"):
        clos.path = path
        clos.zero_grad(set_to_none=True)
        out = clos(x)
        (out ** 2).sum().backward()
        results[path] = [out] + [p.grad.clone() for p in clos.parameters()]
    for a, b in zip(results["stages"], results["composed"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    weight, bias = clos.composed()
    assert torch.allclose(weight, dense_map(clos, 96)[0], atol=1e-5)
    assert torch.allclose(bias, dense_map(clos, 96)[1], atol=1e-5)


def test_cost_model_picks_the_composed_weight_only_for_many_rows_through_wide_stages():
    clos = Clos(1536, 384, 4)  # 393,216 stage MACs per row against 589,824 dense: memory-bound stages
    cpu_fp32 = (3.0, 4.0)  # the factors measured on this project's CPU in fp32
    assert clos.uses_composed_weight(2048, factors=cpu_fp32) and not clos.uses_composed_weight(32, factors=cpu_fp32)
    assert not Clos(1536, 384, 2).uses_composed_weight(2048, factors=cpu_fp32)
    clos.path = "composed"
    assert clos.uses_composed_weight(1)
    clos.path = "fast"
    with pytest.raises(UserError, match="Clos.path must be 'auto', 'stages' or 'composed', got 'fast'"):
        clos(torch.zeros(1, 1536))


def test_cost_factors_are_measured_once_per_shape_and_precision_without_touching_the_random_stream():
    from pruning_lab.clos import cost

    clos, x = Clos(96, 64, 2), torch.randn(8, 96)
    for key in [k for k in cost._MEASURED if dict(k[3]) == clos.config()]:
        del cost._MEASURED[key]
    torch.manual_seed(1)
    clos(x)  # measures (cpu, fp32) for this shape
    after_measuring = torch.rand(4)
    assert len([k for k in cost._MEASURED if dict(k[3]) == clos.config()]) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        clos(x)  # bf16 is measured separately
    factors = {k[2]: v for k, v in cost._MEASURED.items() if dict(k[3]) == clos.config()}
    assert set(factors) == {torch.float32, torch.bfloat16}
    assert all(stage > 0 and compose >= 0 for stage, compose in factors.values())
    torch.manual_seed(1)
    clos(x)  # measured already: nothing is timed or drawn
    assert torch.equal(torch.rand(4), after_measuring)


def test_measured_factors_reproduce_the_measured_times():
    from pruning_lab.clos.cost import factors_from_times

    clos, rows, dense = Clos(384, 384, 4), 512, 384 * 384
    times = {"dense": 2.0, "stages": 5.0, "composed": 3.0}  # ms at 512 rows
    stage, compose = factors_from_times(clos, times, rows)
    ms_per_mac = times["dense"] / (rows * dense)
    assert stage * rows * clos.stage_macs() * ms_per_mac == pytest.approx(5.0)
    assert (rows * dense + compose * dense * clos.b2) * ms_per_mac == pytest.approx(3.0)
    assert clos.uses_composed_weight(rows, factors=(stage, compose))  # 3 ms < 5 ms
    assert not clos.uses_composed_weight(rows, factors=factors_from_times(clos, {**times, "composed": 6.0}, rows))


def test_invalid_shapes_are_clear_errors():
    with pytest.raises(UserError, match="in_features=784 is not divisible by the switch size 30"):
        Clos(784, 784, bin_=30)
    with pytest.raises(UserError, match="multiplier must be an integer >= 1"):
        Clos(784, 784, 0)
    with pytest.warns(UserWarning, match="in_features=97 has no divisor"):
        Clos(97, 64)


def test_dense_layer_that_is_a_clos_map_is_recovered():
    torch.manual_seed(0)
    teacher = Clos(64, 64, 4)  # zero biases: per-switch biases depend on the gauge of the factors
    weight, bias = dense_map(teacher, 64)
    dense = torch.nn.Linear(64, 64)
    with torch.no_grad():
        dense.weight.copy_(weight)
        dense.bias.copy_(bias)
    student = Clos(64, 64, 4)
    result = fit_to_dense(student, dense, iterations=300)
    assert result["weight_relative_error"] < 1e-5 and bias.abs().max() == 0 and result["bias_relative_error"] < 1e-5
    x = torch.randn(100, 64)
    assert relative_error(student(x), dense(x)) < 1e-5


def test_data_aware_fit_lowers_the_output_error():
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 32)
    x = torch.randn(512, 64) @ torch.randn(64, 64) * 0.3  # correlated inputs, as real activations are
    with torch.no_grad():
        y = dense(x)
    clos = Clos(64, 32, 2)
    fit_to_dense(clos, dense, iterations=20)
    with torch.no_grad():
        before = relative_error(clos(x), y)
    result = fit_clos(clos, x, y, steps=300, lr=3e-3)
    assert result["relative_error"] < before


def test_each_least_squares_step_is_the_exact_optimum_of_its_stage():
    """After a sweep of the data-aware ALS the egress stage is optimal given the others: the gradient of the
    squared output error with respect to it vanishes; no sweep raises the training error, and the error a sweep
    reports from its residual is the one computed from scratch."""
    from pruning_lab.clos.fit import ClosFactors, als_sweep, factors_error, output_statistics, stats_error

    torch.manual_seed(0)
    x = torch.randn(400, 48) @ torch.randn(48, 48) * 0.3
    y = x @ torch.randn(48, 36)
    clos = Clos(48, 36, 2)
    stats = output_statistics(x, y)
    f = ClosFactors(clos)
    errors, reported = [stats_error(f.weight(), stats)], []
    for _ in range(4):
        reported.append(als_sweep(f, stats, 0.0))  # from the residual it keeps current
        errors.append(stats_error(f.weight(), stats))
        assert abs(factors_error(f, stats) - errors[-1]) < 1e-9  # W Σ through the blocks
    assert max(abs(a - b) for a, b in zip(reported, errors[1:])) < 1e-9, (reported, errors)
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:])) and errors[-1] < 0.8 * errors[0], errors
    # A sweep ends with the middle weights of the last ingress switch, solved exactly given all the rest: the
    # gradient of ||X W^T - Y||^2 with respect to them is zero (to rounding), and not with respect to the others.
    d = f.d.clone().requires_grad_(True)
    weight = torch.einsum("lok,jlk,jki->loji", f.a, d, f.b).reshape(36, 48)
    loss = ((x.double() @ weight.T - y.double()) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, d)
    assert grad[-1].abs().max() < 1e-8 * grad[0].abs().max(), (grad[-1].abs().max(), grad[0].abs().max())


def test_least_squares_fit_beats_the_gradient_fit_from_the_same_start():
    """Targets made by another Clos layer: from the same weight-space start, the data-aware ALS ends with a lower
    held-out error than 1,000 Adam steps (the fit before it), and far below its start."""
    from pruning_lab.clos.fit import LayerData, fit_clos_als

    torch.manual_seed(0)
    truth = Clos(48, 48, 2)
    mixing = torch.randn(48, 48)  # correlated inputs, as real activations are
    x, x_val = torch.randn(1000, 48) @ mixing, torch.randn(300, 48) @ mixing
    with torch.no_grad():
        y, y_val = truth(x), truth(x_val)
        dense = torch.nn.Linear(48, 48)
        dense.weight.copy_(truth.composed()[0])
        dense.bias.copy_(truth.composed()[1])
    student = Clos(48, 48, 2)
    fit_to_dense(student, dense, 10, "svd")
    start = {k: v.clone() for k, v in student.state_dict().items()}
    squares = fit_clos_als(student, LayerData(x, y, x_val, y_val), 100)
    student.load_state_dict(start)
    gradient = fit_clos(student, x, y, 1000, x_val=x_val, y_val=y_val)
    assert squares["relative_error_heldout"] < gradient["relative_error_heldout"], (squares, gradient)
    assert squares["relative_error_heldout"] < 0.5 * squares["heldout_by_sweep"][0]


def test_anderson_finds_the_fixed_point_of_a_linear_map_in_as_many_steps_as_its_dimension():
    """Anderson acceleration of a linear contraction x -> M x + c is GMRES on (I - M) x = c: with a history as deep
    as the dimension it lands on the fixed point after dimension + 1 steps, where plain iteration is still far."""
    from pruning_lab.clos.fit import Anderson

    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    m = q @ torch.diag(torch.tensor([0.95, 0.9, 0.8, -0.7, 0.5, 0.3], dtype=torch.float64)) @ q.T
    c = torch.randn(6, dtype=torch.float64)
    fixed = torch.linalg.solve(torch.eye(6, dtype=torch.float64) - m, c)
    anderson, x, plain = Anderson(depth=6, ridge=0.0), torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    for _ in range(7):
        after = m @ x + c
        x = anderson.point(x, after)
        x = after if x is None else x
        plain = m @ plain + c
    assert (x - fixed).norm() < 1e-8 * fixed.norm()
    assert (plain - fixed).norm() > 0.2 * fixed.norm()


def test_anderson_acceleration_ends_the_sweeps_lower_than_the_line_step():
    """A layer a little off a Clos map: after the same 40 sweeps, the Anderson points (taken only where they lower
    the training error) leave a lower held-out error than the longer step along each sweep's change."""
    from pruning_lab.clos.fit import LayerData, fit_clos_als

    torch.manual_seed(0)
    truth, mixing = Clos(64, 64, 2), torch.randn(64, 64)
    x, x_val = torch.randn(2000, 64) @ mixing, torch.randn(500, 64) @ mixing
    with torch.no_grad():
        dense = torch.nn.Linear(64, 64)
        weight, bias = truth.composed()
        off = torch.randn(64, 64)
        dense.weight.copy_(weight + 0.3 * off * weight.norm() / off.norm())
        dense.bias.copy_(bias)
        y, y_val = dense(x), dense(x_val)
    errors = {}
    for accel in ("line", "anderson"):
        torch.manual_seed(1)
        layer = Clos(64, 64, 2)
        fit_to_dense(layer, dense, 10, "svd")
        errors[accel] = fit_clos_als(layer, LayerData(x, y, x_val, y_val), 40, patience=41, accel=accel)[
            "heldout_by_sweep"]
    assert errors["anderson"][-1] < 0.98 * errors["line"][-1], errors
    assert errors["anderson"][0] == errors["line"][0]  # the same start


def test_the_fit_finishes_from_the_statistics_exactly_as_on_the_rows():
    """The last egress solve for the affine map (statistics with a constant input appended) is the row-wise least-
    squares optimum: solving it again on the rows changes nothing; the errors from the statistics are the rows'."""
    from pruning_lab.clos.fit import LayerData, fit_clos_als, solve_last_stage

    torch.manual_seed(0)
    x = (torch.randn(600, 48) @ torch.randn(48, 48) + 2.0).double()  # not centred: the biases matter
    y = x @ torch.randn(48, 36).double() + 3.0
    clos = Clos(48, 36, 2).double()
    clos.path = "stages"
    result = fit_clos_als(clos, LayerData(x[:400], y[:400], x[400:], y[400:]), 5)
    with torch.no_grad():
        fitted = clos(x)
        assert result["relative_error"] == pytest.approx(relative_error(clos(x[:400]), y[:400]), rel=1e-6)
        assert result["relative_error_heldout"] == pytest.approx(relative_error(clos(x[400:]), y[400:]), rel=1e-6)
        solve_last_stage(clos, x[:400], y[:400], ridge=1e-6)
        assert relative_error(clos(x), fitted) < 1e-6


def test_the_least_squares_fit_stops_once_the_held_out_error_stops_falling():
    from pruning_lab.clos.fit import stopping_sweep

    falling = [1.0 / k for k in range(1, 30)]
    assert stopping_sweep(falling, 5, 1e-3) is None
    flat = [1.0, 0.5, 0.4, 0.39995, 0.39994, 0.39993, 0.39992, 0.39991, 0.3999]
    assert stopping_sweep(flat, 5, 1e-3) == 8  # sweep 8 is less than a thousandth below sweep 3's 0.4
    rising = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert stopping_sweep(rising, 5, 1e-3) == 7


def test_layer_examples_pair_converted_inputs_with_the_original_outputs():
    """After an earlier layer is converted, the next layer is fitted on the inputs it now receives,
    towards what the original model's layer produced, not towards its own output on changed inputs."""
    import copy

    from distillation_lab.clos_convert import layer_examples
    from pruning_lab.surgery import replace_module

    torch.manual_seed(0)
    original = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    model = copy.deepcopy(original)
    replace_module(model, "0", Clos(16, 16, 1))  # an untrained conversion: far from the original
    data = [(torch.randn(8, 16), torch.zeros(8)) for _ in range(3)]
    x, y = layer_examples(model, original, "2", data, limit=16)
    inputs = torch.cat([b for b, _ in data[:2]])  # the limit stops after the batch that reaches it
    with torch.no_grad():
        assert torch.allclose(x, model[1](model[0](inputs)))
        assert torch.allclose(y, original(inputs))
        assert relative_error(model[2](x), y) > 0.1  # the layer's own outputs would be the wrong target
        x_own, y_own = layer_examples(model, None, "2", data, limit=16)
        assert torch.equal(x_own, x) and torch.allclose(y_own, model[2](x))
    assert not y_own.requires_grad  # targets are data: no graph through the dense layer held with them


class _Fork(torch.nn.Module):
    """a feeds b and c side by side (as a block's input feeds q, k and v), whose product feeds d."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.d = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.d(self.b(h) * self.c(h))


@pytest.mark.parametrize("memory", [None, 1])  # 1 byte: every pass keeps one layer
def test_layer_examples_share_passes_and_match_one_layer_at_a_time(memory):
    """The layers converted in sequence get the same (inputs, targets) as when each is captured alone, with b and
    c (independent of each other) captured in one pass of the model and the original's outputs of all four in one."""
    import copy

    from distillation_lab.clos_convert import LayerExamples, independent_runs, layer_examples
    from pruning_lab.surgery import replace_module

    torch.manual_seed(0)
    original = _Fork().eval()
    model = copy.deepcopy(original)
    names = ["a", "b", "c", "d"]
    data = [(torch.randn(8, 8), torch.zeros(8)) for _ in range(3)]
    assert independent_runs(model, names, data) == {"a": ["a"], "b": ["b", "c"], "c": ["c"], "d": ["d"]}
    examples = LayerExamples(model, original, names, data, limit=16, memory=memory)
    passes = {"model": 0, "original": 0}
    for key, net in (("model", model), ("original", original)):
        net.register_forward_pre_hook(lambda *_, key=key: passes.__setitem__(key, passes[key] + 1))
    for name in names:
        x, y = examples(name)
        x_alone, y_alone = layer_examples(model, original, name, data, limit=16)
        assert torch.equal(x, x_alone) and torch.equal(y, y_alone)
        replace_module(model, name, Clos(8, 8 if name != "d" else 4, 1))  # an untrained conversion: far from it
    # two batches per pass; the one-layer captures above add 2 passes of each model per layer
    alone = 2 * len(names)
    assert passes["model"] - alone == 2 * (3 if memory is None else 4)
    assert passes["original"] - alone == 2 * (1 if memory is None else 4)


@pytest.mark.e2e
def test_clos_convert_records_surgery_and_replays_it(tmp_path, capsys):
    out = tmp_path / "models"
    assert main(["train-teacher", "--model", "mnist_mlp", "--model-args", "{hidden: [784, 32]}", "--dataset",
                 "mnist_embedded", "--epochs", "2", "--optimizer", "adam", "--lr", "1e-3", "--train-subset", "1024",
                 "--val-size", "200", "--out-dir", str(out), "--name", "mlp", "--no-progress"]) == 0
    assert main(["clos-convert", "--checkpoint", str(out / "mlp.pth"), "--layers", "fc1", "--multiplier", "2",
                 "--fit-sweeps", "10", "--fit-accel", "anderson", "--als-iterations", "5", "--calibration-images",
                 "512", "--finetune-epochs", "1", "--temperature", "2"]) == 0
    text = capsys.readouterr().out
    assert "fc1: 615,440 -> 131,824 parameters" in text and "after KD fine-tuning" in text
    ckpt = load_checkpoint(out / "mlp_clos_m2.pth")
    assert ckpt["surgery"] == [{"kind": "clos", "layer": "fc1",
                                "config": {"in_features": 784, "out_features": 784, "multiplier": 2, "bin_": 28, "bout": 28}}]
    model = build_model(ckpt)
    assert isinstance(model.fc1, Clos)
    summary = ckpt["clos"]
    assert summary["fit_budget"] == {"als_iterations": 5, "als_start": "svd", "sweeps": 10, "accel": "anderson"}
    assert summary["layers"][0]["data_aware"]["sweeps"] <= 10
    assert summary["parameters_after"] == sum(p.numel() for p in model.parameters()) < summary["parameters_before"]
    tuned = load_checkpoint(out / "mlp_clos_m2_kd.pth")
    assert tuned["surgery"] == ckpt["surgery"] and isinstance(build_model(tuned).fc1, Clos)
    assert tuned["config"]["loss"]["kd"] == {"weight": 0.5, "temperature": 2.0}  # the loss options reach the KD run
    assert tuned["teacher"]["checkpoint"] == str(out / "mlp.pth") and ckpt["config"]["name"] == "mlp_clos_m2"
    # An unknown layer pattern names the layers there are.
    assert main(["clos-convert", "--checkpoint", str(out / "mlp.pth"), "--layers", "attn.*"]) == 2
    assert "the model's linear layers: fc1, fc2, fc3" in capsys.readouterr().err


def test_clos_convert_vit_attention_and_mlp(tmp_path, capsys):
    out = tmp_path / "models"
    assert main(["train-student", "--model", "vit_student", "--model-args", "{depth: 1, embed_dim: 32, num_heads: 2}",
                 "--dataset", "mnist_embedded", "--epochs", "1", "--optimizer", "adamw", "--lr", "1e-3",
                 "--train-subset", "256", "--val-size", "100", "--out-dir", str(out), "--name", "vit",
                 "--no-progress"]) == 0
    assert main(["clos-convert", "--checkpoint", str(out / "vit.pth"), "--layers",
                 "vit.blocks.*.attn.qkv,vit.blocks.*.attn.proj,vit.blocks.*.mlp.fc*", "--fit-sweeps", "5",
                 "--als-iterations", "3", "--calibration-images", "64", "--allow-more-parameters"]) == 0
    ckpt = load_checkpoint(out / "vit_clos_m4.pth")
    assert [s["layer"] for s in ckpt["surgery"]] == ["vit.blocks.0.attn.qkv", "vit.blocks.0.attn.proj",
                                                      "vit.blocks.0.mlp.fc1", "vit.blocks.0.mlp.fc2"]
    model = build_model(ckpt)
    assert isinstance(model.vit.blocks[0].attn.qkv, Clos)
    logits, _ = model(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


# --- Clos's peers at equal parameters: low-rank and Monarch --------------------------------------------------

def test_monarch_blocks_have_the_rank_and_its_projection_recovers_a_monarch_map():
    from pruning_lab.clos.peers import Monarch, project_monarch, solve_monarch_last_stage

    torch.manual_seed(0)
    source = Monarch(48, 36, rank=2, in_blocks=6, out_blocks=4)
    x = torch.randn(300, 48)
    with torch.no_grad():
        assert torch.allclose(source(x), x @ source.dense_weight().T + source.bias, atol=1e-5)
        weight = source.dense_weight()
    blocks = weight.reshape(4, 9, 6, 8).permute(0, 2, 1, 3)  # block (l, k): output group l, input block k
    assert {int(torch.linalg.matrix_rank(b)) for b in blocks.reshape(-1, 9, 8)} == {2}
    fitted = Monarch(48, 36, rank=2, in_blocks=6, out_blocks=4)
    project_monarch(fitted, weight, source.bias.detach())
    assert relative_error(fitted(x), source(x).detach()) < 1e-5
    # For a dense target the projection is the per-block rank-R SVD: its error is the tail singular values.
    dense = torch.randn(36, 48)
    project_monarch(fitted, dense, None)
    tail = torch.linalg.svdvals(dense.reshape(4, 9, 6, 8).permute(0, 2, 1, 3))[..., 2:]
    assert torch.allclose((fitted.dense_weight() - dense).norm(), tail.norm(), rtol=1e-4)
    # The last stage is linear for a fixed first stage: its least-squares solve is exact for a Monarch target.
    with torch.no_grad():
        fitted.w1.copy_(source.w1)
    solve_monarch_last_stage(fitted, x, source(x).detach())
    assert relative_error(fitted(x), source(x).detach()) < 1e-5


def test_monarch_least_squares_sweeps_are_exact_stage_optima_and_beat_adam():
    """Monarch's data-aware ALS (on the centred statistics): no sweep raises the training error, a sweep ends with
    the last input block's first stage at its exact optimum (zero gradient), the bias is the best one; from the
    same projection start it stops within 1% of 1,000 Adam steps' held-out error here (a dense random target, far
    from any Monarch map, where the sweeps creep) and, run on until the held-out error stops falling, below it."""
    from pruning_lab.clos.fit import LayerData, MonarchFactors, centred, factors_error, fit_monarch_als, \
        monarch_sweep, output_statistics, stats_error
    from pruning_lab.clos.peers import Monarch, project_monarch

    torch.manual_seed(0)
    mixing = torch.randn(48, 48)  # correlated, not centred inputs, as real activations are
    x, x_val = torch.randn(1000, 48) @ mixing + 1.0, torch.randn(300, 48) @ mixing + 1.0
    target = torch.nn.Linear(48, 36)
    with torch.no_grad():
        y, y_val = target(x), target(x_val)
    student = Monarch(48, 36, rank=2, in_blocks=6, out_blocks=4)
    project_monarch(student, target.weight.detach(), target.bias.detach())
    start = {k: v.clone() for k, v in student.state_dict().items()}

    stats = centred(output_statistics(x, y))
    f = MonarchFactors(student)
    errors, reported = [stats_error(f.weight(), stats)], []
    for _ in range(4):
        reported.append(monarch_sweep(f, stats, 0.0))
        errors.append(stats_error(f.weight(), stats))
        assert abs(factors_error(f, stats) - errors[-1]) < 1e-9
    assert max(abs(a - b) for a, b in zip(reported, errors[1:])) < 1e-9, (reported, errors)
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:])) and errors[-1] < 0.9 * errors[0], errors
    w1 = f.w1.clone().requires_grad_(True)
    weight = torch.einsum("lskr,klrp->lskp", f.w2.view(4, 9, 6, 2), w1.view(6, 4, 2, 8)).reshape(36, 48)
    xc, yc = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    (grad,) = torch.autograd.grad(((xc @ weight.T - yc) ** 2).sum(), w1)
    assert grad[-1].abs().max() < 1e-8 * grad[0].abs().max(), (grad[-1].abs().max(), grad[0].abs().max())

    squares = fit_monarch_als(student, LayerData(x, y, x_val, y_val), 100)
    with torch.no_grad():  # the bias is the best for the fitted map: the mean residual is zero
        assert (student(x) - y).mean(0).abs().max() < 1e-4 * y.abs().mean()
    student.load_state_dict(start)
    longer = fit_monarch_als(student, LayerData(x, y, x_val, y_val), 1000, tolerance=0.0)
    student.load_state_dict(start)
    gradient = fit_clos(student, x, y, 1000, x_val=x_val, y_val=y_val)
    assert squares["relative_error_heldout"] < 1.01 * gradient["relative_error_heldout"], (squares, gradient)
    assert longer["relative_error_heldout"] < gradient["relative_error_heldout"], (longer, gradient)
    assert squares["relative_error_heldout"] < 0.7 * squares["heldout_by_sweep"][0]


def test_lowrank_closed_forms_svd_and_reduced_rank_regression():
    from pruning_lab.clos.fit import output_statistics
    from pruning_lab.clos.peers import LowRank, fit_lowrank_to_outputs, project_lowrank

    torch.manual_seed(0)
    dense = torch.nn.Linear(40, 30)
    layer = LowRank(40, 30, 5)
    project_lowrank(layer, dense.weight.detach(), dense.bias.detach())
    s = torch.linalg.svdvals(dense.weight.detach())
    with torch.no_grad():
        assert torch.allclose((layer.u.weight @ layer.v.weight - dense.weight).norm(), s[5:].norm(), rtol=1e-4)
    x = (torch.randn(2000, 40) @ torch.randn(40, 40)) * torch.linspace(0.01, 3, 40) + 1.0  # correlated, not centred
    with torch.no_grad():
        y = dense(x)
        svd_error = relative_error(layer(x), y)
    fit_lowrank_to_outputs(layer, output_statistics(x, y))
    with torch.no_grad():
        rrr_error = relative_error(layer(x), y)
        # The optimum for the outputs: no rank-5 map does better, e.g. not a small perturbation of it.
        w = layer.u.weight @ layer.v.weight
        for _ in range(5):
            u, s_, vh = torch.linalg.svd(w + 0.01 * torch.randn_like(w))
            other = (u[:, :5] * s_[:5]) @ vh[:5]
            bias = (y - x @ other.T).mean(0)
            assert relative_error(x @ other.T + bias, y) >= rrr_error - 1e-6
    assert rrr_error < 0.8 * svd_error, (rrr_error, svd_error)


def test_clos_grouped_svd_start_is_exact_for_a_map_of_its_form_and_helps_the_als():
    from pruning_lab.clos.fit import fit_weights_als, grouped_svd_start

    torch.manual_seed(0)
    source = Clos(64, 64, 2)
    assert grouped_svd_start(source, torch.randn(64, 64))  # b2 = 16 = 2 * bout: a start exists
    weight = source.composed()[0].detach()
    student = Clos(64, 64, 2)
    assert grouped_svd_start(student, weight)
    assert relative_error(student.composed()[0], weight) < 1e-6  # a map of the grouped form is recovered at once
    dense = torch.randn(64, 64)
    svd_start, random_start = Clos(64, 64, 2), Clos(64, 64, 2)
    grouped_svd_start(svd_start, dense)
    assert fit_weights_als(svd_start, dense, 10)[-1] < fit_weights_als(random_start, dense, 10)[-1]
    assert not grouped_svd_start(Clos(64, 48, 1), torch.randn(48, 64))  # b2 = 8 is no multiple of bout = 6


@pytest.mark.parametrize("structure", ["lowrank", "monarch"])
def test_clos_convert_to_a_peer_structure_at_the_clos_layers_parameters(tmp_path, capsys, structure):
    from pruning_lab.clos.peers import LowRank, Monarch

    out = tmp_path / "models"
    assert main(["train-teacher", "--model", "mnist_mlp", "--model-args", "{hidden: [784, 32]}", "--dataset",
                 "mnist_embedded", "--epochs", "2", "--optimizer", "adam", "--lr", "1e-3", "--train-subset", "1024",
                 "--val-size", "200", "--out-dir", str(out), "--name", "mlp", "--no-progress"]) == 0
    assert main(["clos-convert", "--checkpoint", str(out / "mlp.pth"), "--layers", "fc1", "--structure", structure,
                 "--params-like", "clos:2", *(["--fit-sweeps", "10"] if structure != "lowrank" else []),
                 "--calibration-images", "256"]) == 0
    text = capsys.readouterr().out
    expected = {"lowrank": "fc1: 615,440 -> 132,496 parameters (Clos m=2: 131,824)",  # rank 84 (83: 130,928)
                "monarch": "fc1: 615,440 -> 132,496 parameters (Clos m=2: 131,824)"}[structure]  # rank 3
    assert expected in text, text
    ckpt = load_checkpoint(out / f"mlp_{structure}_m2.pth")
    assert [s["kind"] for s in ckpt["surgery"]] == [structure]
    model = build_model(ckpt)
    assert isinstance(model.fc1, {"lowrank": LowRank, "monarch": Monarch}[structure])
    summary = ckpt["clos"]
    assert summary["test_accuracy_after"] > summary["test_accuracy_before"] - 0.05  # the fit keeps the model working
    assert summary["layers"][0]["data_aware"]["relative_error_heldout"] < 0.5
    assert main(["report", "--models-dir", str(out), "--output", str(tmp_path / "r.json"), "--device", "cpu"]) == 0
    assert f"mlp_{structure}_m2" in (tmp_path / "r.md").read_text()


@pytest.mark.e2e
def test_clos_convert_auto_keeps_per_layer_the_structure_with_the_lowest_held_out_error(tmp_path, capsys):
    out = tmp_path / "models"
    assert main(["train-teacher", "--model", "mnist_mlp", "--model-args", "{hidden: [256, 64]}", "--dataset",
                 "mnist_embedded", "--epochs", "1", "--optimizer", "adam", "--lr", "1e-3", "--train-subset", "512",
                 "--val-size", "200", "--out-dir", str(out), "--name", "mlp", "--no-progress"]) == 0
    assert main(["clos-convert", "--checkpoint", str(out / "mlp.pth"), "--layers", "fc1,fc2", "--structure", "auto",
                 "--multiplier", "2", "--fit-sweeps", "10", "--calibration-images", "256"]) == 0
    ckpt = load_checkpoint(out / "mlp_auto_m2.pth")
    layers = ckpt["clos"]["layers"]
    for layer, record in zip(layers, ckpt["surgery"]):
        assert set(layer["candidates"]) == {"clos", "lowrank", "monarch"}
        best = min(layer["candidates"], key=layer["candidates"].get)
        assert record["kind"] == layer["structure"] == best and record["layer"] == layer["layer"]
        assert layer["data_aware"]["relative_error_heldout"] == layer["candidates"][best]
    rebuilt = build_model(ckpt)  # the chosen structures replay on load
    assert [type(rebuilt.get_submodule(r["layer"])).__name__.lower() for r in ckpt["surgery"]] == \
        [{"clos": "clos", "lowrank": "lowrank", "monarch": "monarch"}[r["kind"]] for r in ckpt["surgery"]]
    assert main(["clos-convert", "--checkpoint", str(out / "mlp.pth"), "--layers", "fc1", "--structure", "auto",
                 "--fit", "weights", "--output", str(tmp_path / "w.pth")]) == 2
    assert "--structure auto keeps, per layer" in capsys.readouterr().err
    # --budget: a third of the two layers' dense parameters, spent per layer on a structure and multiplier.
    dense = {n: build_model(load_checkpoint(out / "mlp.pth")).get_submodule(n) for n in ("fc1", "fc2")}
    total = sum(sum(p.numel() for p in d.parameters()) for d in dense.values())
    assert main(["clos-convert", "--checkpoint", str(out / "mlp.pth"), "--layers", "fc1,fc2", "--structure", "lowrank",
                 "--budget", "0.33", "--calibration-images", "128"]) == 0  # closed-form fits: seconds
    ckpt = load_checkpoint(out / "mlp_lowrank_budget0.33.pth")
    rebuilt = build_model(ckpt)
    spent = sum(sum(p.numel() for p in rebuilt.get_submodule(n).parameters()) for n in dense)
    assert spent <= 0.33 * total and ckpt["clos"]["budget_share"] == 0.33
    for layer in ckpt["clos"]["layers"]:
        assert "dense" in layer["candidates"] and "lowrank m=2" in layer["candidates"]
        if layer["structure"] != "dense":
            assert layer["candidates"][f"{layer['structure']} m={layer['multiplier']}"] == \
                layer["data_aware"]["relative_error_heldout"]
    capsys.readouterr()
    assert main(["clos-convert", "--checkpoint", str(out / "mlp.pth"), "--layers", "fc1,fc2", "--budget", "0.001",
                 "--calibration-images", "64", "--output", str(tmp_path / "b.pth")]) == 2
    assert "but their smallest candidates already take" in capsys.readouterr().err
    assert not (tmp_path / "b.pth").exists()


def test_budget_allocation_takes_the_most_error_saved_per_parameter_first():
    """Greedy by hand: from the cheapest options (a: 10 params, error 0.5; b: 10, 0.4), the best ratio is
    a's 30-parameter option (0.3 saved / 20 = 0.015 per parameter) over b's (0.1 / 20); then, with 40 left,
    b's 30 (0.005 per parameter) fits and a's dense (100) does not."""
    from distillation_lab.clos_budget import allocate

    options = {"a": [{"parameters": 10, "error": 0.5}, {"parameters": 30, "error": 0.2},
                     {"parameters": 100, "error": 0.0}],
               "b": [{"parameters": 10, "error": 0.4}, {"parameters": 10, "error": 0.6},
                     {"parameters": 30, "error": 0.3}]}
    chosen = allocate(options, 60)
    assert (chosen["a"]["parameters"], chosen["b"]["parameters"]) == (30, 30)
    assert allocate(options, 40)["b"]["error"] == 0.4  # no room for b's upgrade after a's
    assert allocate(options, 1000)["a"]["error"] == 0.0  # room for everything: dense where it is best
    with pytest.raises(UserError, match="smallest candidates already take 20"):
        allocate(options, 19)


@pytest.mark.parametrize("shape", [(784, 784), (384, 384), (384, 1536), (1536, 384), (192, 576), (192, 192),
                                   (192, 768), (784, 512), (512, 256)])
@pytest.mark.parametrize("m", [4, 2])
def test_monarch_at_the_clos_budget_comes_within_two_percent(shape, m):
    import torch.nn as nn

    from pruning_lab.clos.structures import STRUCTURES, clos_for, parameter_count

    with torch.device("meta"):
        dense = nn.Linear(*shape)
        budget = parameter_count(clos_for(dense, m))
        monarch = STRUCTURES["monarch"].make(dense, m)
    assert abs(parameter_count(monarch) - budget) <= 0.02 * budget, (monarch.k, monarch.l, monarch.rank)
    assert monarch.k >= 2 and monarch.l >= 2  # still two block-diagonal stages, not a low-rank layer


def test_ridge_solve_handles_the_batches_where_lus_solve_failed():
    """16 systems of 161 in float64 (a Monarch last stage): torch.linalg.solve's LU failed on them with MKL
    once torch.set_num_threads had been called (as conftest and many cluster scripts do); Cholesky does not."""
    from pruning_lab.clos.linalg import ridge_solve

    torch.manual_seed(0)
    a = torch.randn(16, 161, 300, dtype=torch.float64)
    rhs = torch.randn(16, 161, 16, dtype=torch.float64)
    gram = a @ a.transpose(1, 2)
    x = ridge_solve(gram, rhs, 1e-6)
    scale = gram.diagonal(dim1=1, dim2=2).mean(1)[:, None, None]
    assert torch.allclose((gram + 1e-6 * scale * torch.eye(161, dtype=torch.float64)) @ x, rhs, atol=1e-9)
    singular = torch.zeros(2, 5, 5, dtype=torch.float64)  # not positive definite even with the ridge: least squares
    assert torch.equal(ridge_solve(singular, torch.ones(2, 5, 1, dtype=torch.float64), 0.0), torch.zeros(2, 5, 1, dtype=torch.float64))
