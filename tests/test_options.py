"""The options of prune and clos-convert come from their dataclasses (as the training flags come from Config):
every field has a flag and every flag a field, one default, and a bad value is refused with the same one line
through the command line as through the Python API."""
import argparse
import dataclasses

import pytest

from distillation_lab.clos_convert import ClosConvertOptions
from distillation_lab.main import build_parser, main, options_from_args
from distillation_lab.prune import PruneOptions
from pruning_lab.config import LOSS_SHORTHANDS, Config, flag_name, make_config
from pruning_lab.errors import UserError

COMMANDS = {"prune": (PruneOptions, ["--checkpoint", "x.pth"], {"checkpoint": "x.pth"}),
            "clos-convert": (ClosConvertOptions, ["--checkpoint", "x.pth", "--layers", "fc1"],
                             {"checkpoint": "x.pth", "layers": "fc1"})}


def subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command, field, typed, value", [
    ("prune", "round_to", "0", 0), ("prune", "steps", "0", 0), ("prune", "finetune_epochs", "-1", -1),
    ("prune", "calibration_examples", "0", 0), ("prune", "finetune_lr", "-1", -1.0),
    ("prune", "finetune_lr", "inf", float("inf")), ("prune", "amount", "1.5", 1.5),
    ("prune", "method", "magic", "magic"), ("prune", "importance", "l3", "l3"),
    ("prune", "target_parameters", "0.5x", "0.5x"),
    ("prune", "target_macs", "0", "0"), ("prune", "device", "tpu", "tpu"),
    ("prune", "round_to", "eight", "eight"),
    ("clos-convert", "als_iterations", "0", 0), ("clos-convert", "fit_sweeps", "0", 0),
    ("clos-convert", "calibration_examples", "0", 0), ("clos-convert", "multiplier", "0", 0),
    ("clos-convert", "finetune_epochs", "-2", -2), ("clos-convert", "finetune_lr", "nan", float("nan")),
    ("clos-convert", "structure", "dense", "dense"), ("clos-convert", "fit", "x", "x"),
    ("clos-convert", "als_start", "svd2", "svd2"),
])
def test_a_bad_value_is_refused_alike_by_the_flag_and_by_the_dataclass(capsys, command, field, typed, value):
    cls, argv, required = COMMANDS[command]
    with pytest.raises(UserError) as api:
        cls(**required, **{field: value})
    assert main([command, *argv, flag_name(field), typed]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {api.value}", err
    assert str(api.value).startswith(flag_name(field) + " must be ")


def test_an_alias_is_named_as_typed_and_checked_as_its_option(capsys):
    assert main(["clos-convert", *COMMANDS["clos-convert"][1], "--calibration-texts", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --calibration-texts must be >= 1, got 0"
    assert main(["clos-convert", *COMMANDS["clos-convert"][1], "--params-like", "clos:0"]) == 2
    assert "M in --params-like clos:M must be >= 1, got 0" in capsys.readouterr().err
    args = subparser("clos-convert").parse_args([*COMMANDS["clos-convert"][1], "--params-like", "clos:3",
                                                 "--calibration-images", "64"])
    o = options_from_args(ClosConvertOptions, args)
    assert (o.multiplier, o.calibration_examples) == (3, 64)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_has_a_flag_and_every_flag_a_field(command):
    cls, _, _ = COMMANDS[command]
    actions = [a for a in subparser(command)._actions if a.dest != "help"]
    fields = {f.name for f in dataclasses.fields(cls)}
    loss_keys = {"loss", *LOSS_SHORTHANDS}  # the `loss` field's flags: Config's loss options
    assert {a.dest for a in actions} == (fields - {"loss"}) | loss_keys
    for a in actions:
        if a.dest in fields:
            assert flag_name(a.dest) in a.option_strings or a.option_strings == ["--params-like"]
        else:
            assert a.option_strings[0] == flag_name(a.dest) and a.dest in Config.__dataclass_fields__


@pytest.mark.parametrize("command", COMMANDS)
def test_defaults_come_from_the_dataclass_and_help_shows_them(command):
    cls, argv, required = COMMANDS[command]
    p = subparser(command)
    assert options_from_args(cls, p.parse_args(argv)) == cls(**required)
    for a in p._actions:
        f = cls.__dataclass_fields__.get(a.dest)
        if f is None or a.required or a.option_strings == ["--params-like"]:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = f.metadata["shown_default"] or default
        assert f"[default: {shown}]" in a.help, (a.dest, a.help)
        if f.metadata["range"]:
            assert f"({f.metadata['range'][0]})" in a.help


def test_flags_set_the_fields_and_numbers_are_converted():
    args = subparser("prune").parse_args(["--checkpoint", "x.pth", "--round-to", "4", "--finetune-lr", "1e-4",
                                          "--no-kd", "--amount", "0.25", "--output", "none"])
    o = options_from_args(PruneOptions, args)
    assert (o.round_to, o.finetune_lr, o.no_kd, o.amount, o.output) == (4, 1e-4, True, 0.25, "none")
    assert PruneOptions(checkpoint="x.pth", finetune_lr=1).finetune_lr == 1.0  # an int where a float goes
    with pytest.raises(UserError, match="--no-kd must be true/false, got 'yes'"):
        PruneOptions(checkpoint="x.pth", no_kd="yes")


def test_config_flags_are_checked_while_parsing_with_the_message_of_the_config(capsys):
    with pytest.raises(UserError) as built:
        make_config({"lr": -1.0}, "command line")
    with pytest.raises(UserError) as parsed:
        build_parser().parse_args(["train-student", "--lr", "-1"])
    assert str(parsed.value) == str(built.value) == "config key 'lr' in command line must be > 0, got -1.0"


def test_given_twice_names_the_first_repeat_by_its_key():
    from pruning_lab.errors import given_twice

    assert given_twice([0, 1, 2]) is None and given_twice([]) is None
    assert given_twice(["a", "b", "a", "b"]) == "a"
    assert given_twice(["x/t.pth", "x/./t.pth"], key=lambda p: p.replace("./", "")) == "x/./t.pth"
