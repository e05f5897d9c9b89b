"""Config: YAML + CLI overrides into one dataclass; unknown keys and wrong types are errors."""
import argparse

import pytest

from pruning_lab.config import Config, add_config_arguments, config_from_args, load_yaml, make_config
from pruning_lab.errors import UserError


def parse(argv, yaml_path=None):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv), yaml_path)


def test_precedence_defaults_yaml_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nlr: 0.01\nmilestones: [3, 5]\nmodel_args: {width: 8}\n")
    cfg = parse(["--lr", "5e-4", "--no-augment"], str(path))
    assert cfg.epochs == 7 and cfg.lr == 5e-4 and cfg.milestones == [3, 5]
    assert cfg.model_args == {"width": 8} and cfg.augment is False
    assert cfg.batch_size == Config().batch_size


def test_cli_types_are_parsed():
    cfg = parse(["--epochs", "3", "--val-size", "none", "--model-args", "{width: 4}", "--milestones", "1", "2"])
    assert cfg.epochs == 3 and cfg.val_size is None and cfg.model_args == {"width": 4} and cfg.milestones == [1, 2]


def test_a_recipes_list_can_be_cleared_from_the_command_line():
    """text_student.yaml keeps layers 0 2 4; `--keep-layers none` reuses it over a student already thinned."""
    recipe = "distillation_lab/configs/text_student.yaml"
    assert parse([], recipe).keep_layers == [0, 2, 4]
    assert parse(["--keep-layers", "none"], recipe).keep_layers == []
    with pytest.raises(UserError, match="--keep-layers takes integers, or none alone to clear the list; got 1 none"):
        parse(["--keep-layers", "1", "none"], recipe)


def test_unknown_yaml_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(UserError, match=r"unknown config key 'learning_rate' in .*bad.yaml.*allowed keys: .*\blr\b"):
        load_yaml(path)


@pytest.mark.parametrize("key,value,expected", [
    ("epochs", "ten", "an integer"), ("epochs", 2.5, "an integer"), ("lr", "fast", "a number"),
    ("augment", "yes", "true/false"), ("milestones", [1, "x"], "a list of integers"),
    ("val_size", "a", "an integer or null"), ("optimizer", "lamb", "one of sgd, adamw, adam"),
])
def test_wrong_type_names_key_and_allowed(key, value, expected):
    with pytest.raises(UserError, match=rf"'{key}'.*{expected}"):
        make_config({key: value})


def test_wrong_type_on_command_line():
    with pytest.raises(UserError, match="'epochs' in command line must be an integer"):
        parse(["--epochs", "many"])


def test_yaml_cannot_construct_objects(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("epochs: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_yaml(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_yaml(tmp_path / "nope.yaml")
