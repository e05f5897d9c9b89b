"""The registries a new method plugs into (loss terms, layer surgery, layer structures), and imports
that go one way: no module imports, even inside a function, a module that imports it back."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import distillation_lab.methods  # noqa: F401  (the registered distillation terms)
from distillation_lab.main import main
from pruning_lab.checkpoint import build_model, load_checkpoint, save_checkpoint
from pruning_lab.clos.fit import LayerData
from pruning_lab.clos.structures import STRUCTURES, FitBudget, clos_for, parameter_count
from pruning_lab.errors import UserError
from pruning_lab.models import create_model
from pruning_lab.surgery import SURGERIES, apply_surgery, register_surgery
from pruning_lab.train.terms import TERMS, build_term, check_loss_spec, register_term, term_list

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def scratch_term():
    """A loss term registered for one test: the mean squared difference of the logits, scaled."""
    @register_term("test_logit_mse", needs_teacher=True, ranges={"scale": ("> 0", lambda v: v > 0)})
    class LogitMSE(nn.Module):
        def __init__(self, scale: float = 1.0) -> None:
            super().__init__()
            self.scale = scale

        def forward(self, s_logits, s_feats, t_logits, t_feats, labels):
            return self.scale * (s_logits - t_logits).pow(2).mean()

    yield LogitMSE
    del TERMS["test_logit_mse"]


def test_a_registered_term_is_a_loss_name_with_its_parameters_checked(scratch_term):
    spec = TERMS["test_logit_mse"]
    assert spec.parameters == ("scale",) and spec.needs_teacher
    assert "test_logit_mse (scale; teacher)" in term_list()
    check_loss_spec({"ce": {"weight": 0.5}, "test_logit_mse": {"weight": 0.5, "scale": 2.0}}, distilling=True)
    with pytest.raises(UserError, match=r"loss term 'test_logit_mse': scale must be > 0, got -1"):
        check_loss_spec({"test_logit_mse": {"weight": 1.0, "scale": -1}}, distilling=True)
    with pytest.raises(UserError, match="unknown parameter.*temperature; allowed: weight, scale"):
        check_loss_spec({"test_logit_mse": {"weight": 1.0, "temperature": 4}}, distilling=True)
    with pytest.raises(UserError, match="needs a teacher"):
        check_loss_spec({"test_logit_mse": {"weight": 1.0}}, distilling=False)
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    term = build_term("test_logit_mse", {"weight": 1.0, "scale": 3.0})
    assert torch.allclose(term(s, [], t, [], torch.zeros(4, dtype=torch.long)), 3 * (s - t).pow(2).mean())


def test_unknown_terms_are_refused_naming_every_registered_one():
    with pytest.raises(UserError) as e:
        check_loss_spec({"kdd": {"weight": 1.0}}, distilling=True)
    for name in ("ce", "kd", "dkd", "feature", "at"):
        assert name in str(e.value)


def test_every_registered_term_builds_from_its_defaults_and_gives_a_finite_loss():
    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(8, 10), torch.randn(8, 10)
    s_feats, t_feats = [torch.randn(8, 4, 8, 8), torch.randn(8, 8, 4, 4)], [torch.randn(8, 16, 8, 8), torch.randn(8, 32, 4, 4)]
    labels = torch.randint(0, 10, (8,))
    for name in TERMS:
        term = build_term(name, {"weight": 1.0}, student_widths=[4, 8], teacher_widths=[16, 32])
        loss = term(s_logits, s_feats, t_logits, t_feats, labels)
        assert loss.ndim == 0 and torch.isfinite(loss), name


def test_distill_help_lists_the_registered_terms(capsys):
    assert main(["distill", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "dkd (alpha, beta, temperature, standardize; teacher)" in out and "pkt (layer; teacher)" in out


def test_every_recorded_kind_of_surgery_is_registered():
    assert set(SURGERIES) == {"clos", "lowrank", "monarch", "prune", "sparse", "keep_layers", "bottleneck"}
    assert set(STRUCTURES) <= set(SURGERIES)


def test_an_unknown_surgery_names_the_known_kinds():
    with pytest.raises(UserError, match="unknown layer surgery 'grow'.*bottleneck, clos"):
        apply_surgery(nn.Linear(2, 2), [{"kind": "grow"}])


def test_a_registered_surgery_is_replayed_when_a_checkpoint_is_loaded(tmp_path):
    @register_surgery("test_halve_fc1")
    def replay(model: nn.Module, step: dict) -> None:
        model.fc1 = nn.Linear(model.fc1.in_features, step["width"])
        model.fc2 = nn.Linear(step["width"], model.fc2.out_features)

    try:
        model = create_model("mnist_mlp", num_classes=10, in_chans=1, image_size=28, hidden=[32, 16])
        apply_surgery(model, [{"kind": "test_halve_fc1", "width": 8}])
        config = {"model": "mnist_mlp", "dataset": "mnist_embedded", "data_dir": "", "seed": 0, "name": "halved",
                  "val_size": None, "image_size": None}
        path = save_checkpoint({"arch": model.arch, "state_dict": model.state_dict(), "surgery": model.surgery,
                                "config": config}, tmp_path / "halved.pth")
        rebuilt = build_model(load_checkpoint(path), source=str(path))
        assert rebuilt.fc1.out_features == 8
        x = torch.randn(3, 1, 28, 28)
        assert torch.equal(rebuilt(x)[0], model(x)[0])
    finally:
        del SURGERIES["test_halve_fc1"]


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_each_structure_is_made_at_the_clos_budget_fitted_and_replayed(name):
    torch.manual_seed(0)
    dense = nn.Linear(64, 48)
    kind = STRUCTURES[name]
    layer = kind.make(dense, 2)
    if hasattr(layer, "path"):
        layer.path = "stages"  # Clos: no timing of its two paths (the cost model has its own tests)
    budget = parameter_count(clos_for(dense, 2))
    assert isinstance(layer, kind.layer)
    assert abs(parameter_count(layer) - budget) <= 0.25 * budget
    fit = kind.fit_weights(layer, dense, FitBudget(als_iterations=5, als_start="random", sweeps=5))
    assert fit["identity_probe_relative_error"] < 1.0  # the fit moved it towards the dense map
    x = torch.randn(256, 64)
    with torch.no_grad():
        y = dense(x)
    data = kind.fit_data(layer, LayerData(x[:192], y[:192], x[192:], y[192:]), FitBudget(sweeps=5))
    assert 0 <= data["relative_error_heldout"] < 1.0
    holder = nn.Sequential(nn.Linear(64, 48))
    apply_surgery(holder, [{"kind": name, "layer": "0", "config": layer.config()}])
    holder[0].load_state_dict(layer.state_dict())
    if hasattr(layer, "path"):
        holder[0].path = "stages"
    with torch.no_grad():
        assert torch.allclose(holder(x), layer(x))


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports anywhere in it (inside functions too), as dotted names."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    if path.name == "__init__.py":
        module = package
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:  # `from pkg import module` imports the module
                sub = f"{target}.{alias.name}"
                found.add(sub if (ROOT / Path(*sub.split("."))).with_suffix(".py").exists()
                          or (ROOT / Path(*sub.split("."))).is_dir() else target)
    return {m for m in found if m.split(".")[0] in ("pruning_lab", "distillation_lab") and m != module}


def test_no_import_circles_between_modules():
    files = [*ROOT.joinpath("pruning_lab").rglob("*.py"), *ROOT.joinpath("distillation_lab").rglob("*.py")]
    names = {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f for f in files}
    graph = {name: {m for m in project_imports(f) if m in names} for name, f in names.items()}
    assert all(not m.startswith("distillation_lab") for name, deps in graph.items()
               if name.startswith("pruning_lab") for m in deps), "pruning_lab imports distillation_lab"
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
