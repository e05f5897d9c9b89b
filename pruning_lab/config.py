"""One config dataclass, loaded from YAML and overridden from the command line.

Order of precedence: dataclass defaults < YAML file (``--config``) < command-line flags.
Unknown keys and values of the wrong type are errors that name the key and what is allowed.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import functools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from .errors import UserError, given_twice


# The datasets, named once here (the data package reads them from here).
GLUE_TASKS = ("cola", "sst2", "mrpc", "rte", "qnli", "mnli", "qqp", "wnli", "stsb")
TEXT_DATASETS = tuple(f"glue-{t}" for t in GLUE_TASKS) + ("textcsv",)
DATASETS = ("cifar10", "mnist", "mnist_embedded", "tweets", "imagefolder", *TEXT_DATASETS, "custom")
IMAGE_SIZE_DATASETS = ("imagefolder", "tweets", *TEXT_DATASETS)  # the datasets that read image_size
NO_DATA_DIR_DATASETS = ("mnist_embedded",)  # ships inside a package and reads no folder


# What a number may be, declared beside its field (`range=`): (the words errors and --help use, the test).
Range = tuple[str, Callable[[Any], bool]]


def minimum(low: float) -> Range:
    """At least `low`."""
    return f">= {low}", lambda v: v >= low


POSITIVE: Range = ("> 0", lambda v: v > 0)
FRACTION: Range = ("in [0, 1)", lambda v: 0 <= v < 1)  # a share removed, a probability below 1
DEVICES = ("auto", "cpu", "cuda")
REQUIRED = dataclasses.MISSING  # the default of a field without one: its flag is required


def option(default: Any, help: str, choices: Any = None, *, range: Optional[Range] = None,
           aliases: tuple = (), shown_default: Optional[str] = None, metavar: Optional[str] = None,
           items: type = int, **kw: Any) -> Any:
    """A dataclass field carrying what its --flag needs, declared once: the --help text, the allowed values
    for strings (`choices`: a tuple, or a function returning one, read when used), the allowed `range` of a
    number, other spellings of the flag (`aliases`), how --help shows a default that is not literal
    (`shown_default`, e.g. what None stands for) and the flag's `metavar`. `add_dataclass_arguments` makes the
    flags and `check_field` checks a value (the flag's and the dataclass's), both from this. A list holds
    `items` (int, or str)."""
    meta = {"help": help, "choices": choices, "range": range, "aliases": aliases, "shown_default": shown_default,
            "metavar": metavar, "items": items}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


_opt = option


@dataclass
class Config:
    """Everything one training run needs; saved resolved inside every checkpoint."""

    # --- what to train
    model: str = _opt("resnet8", "registered model name (listed in the description above)")
    model_args: dict = _opt({}, "extra model constructor arguments, e.g. {width: 16} (YAML or JSON)")
    init_checkpoint: str = _opt("", "start from this checkpoint's weights (and recorded layer surgery)")
    bottleneck: dict = _opt({}, "a discrete key-value bottleneck in place of the classifier, e.g. {codebooks: 8, "
                                "keys: 512, decay: 0.9}: keys fitted to the encoder's outputs on the training data, "
                                "then frozen; values trained (no gradient reaches the encoder through it)")
    keep_layers: list = _opt([], "with init_checkpoint: keep only these of its transformer layers (0-based, "
                                 "increasing), initialised from its weights: a DistilBERT-style student, e.g. 0 2 4 "
                                 "of a 6-layer BERT or ViT",
                              range=("increasing layer indices >= 0",
                                     lambda v: all(a >= 0 for a in v) and v == sorted(set(v))))
    name: str = _opt("", "run name: checkpoints are OUT_DIR/NAME.pth (best) and NAME_last.pth; default: the model name")
    role: str = _opt("model", "what the run produces, recorded in the checkpoint", ("teacher", "student", "model"))
    family: str = _opt("", "the report family the run belongs to, recorded in the checkpoint (default: the "
                           "teacher's when distilling, else the model's: cnn, vit, text, mlp)")
    # --- data
    dataset: str = _opt("cifar10", "dataset (glue-*: a GLUE task in GLUE's TSV layout; textcsv: your train.csv and "
                                   "test.csv with columns text [text_pair] label; custom: your own loaders, Python API)",
                        DATASETS)
    data_dir: str = _opt("data", "where prepare-data put the dataset (imagefolder: the folder with train/ and test/; "
                                 "textcsv: the folder with train.csv and test.csv)")
    image_size: Optional[int] = _opt(None, "imagefolder: square size images are resized to when read (default 32); "
                                           "text: tokens per example (tweets 64, glue-* and textcsv 128)",
                                     range=minimum(1))
    channels: Optional[int] = _opt(None, "imagefolder: 1 reads the images as grayscale, 3 as RGB (default 3)",
                                   range=("1 or 3", lambda v: v in (1, 3)))
    val_size: Optional[int] = _opt(None, "images held out of the training set for validation (default per dataset)",
                                   range=minimum(0))
    train_subset: Optional[int] = _opt(None, "use a fixed class-balanced subset of N training images (smoke runs)",
                                       range=minimum(1))
    labelled_subset: Optional[int] = _opt(None, "keep the labels of only N training images (the ones train_subset N "
                                           "would keep); the rest are unlabelled and reach only distillation terms",
                                          range=minimum(1))
    augment: bool = _opt(True, "random crop (and horizontal flip where the dataset allows it)")
    flip: bool = _opt(True, "horizontal flips when augmenting, where the dataset allows them (never for digits or "
                            "text); --no-flip for your own images that must not be mirrored")
    # --- optimisation
    epochs: int = _opt(200, "number of epochs", range=minimum(1))
    batch_size: int = _opt(128, "batch size", range=minimum(1))
    optimizer: str = _opt("sgd", "optimizer", ("sgd", "adamw", "adam"))
    lr: float = _opt(0.1, "peak learning rate", range=POSITIVE)
    momentum: float = _opt(0.9, "SGD momentum", range=FRACTION)
    weight_decay: float = _opt(5e-4, "weight decay", range=minimum(0))
    scheduler: str = _opt("multistep", "learning-rate schedule", ("multistep", "cosine", "constant"))
    milestones: list = _opt([100, 150, 180], "epochs at which multistep multiplies the lr by gamma",
                             range=("epochs >= 0", lambda v: all(m >= 0 for m in v)))
    gamma: float = _opt(0.1, "multistep decay factor", range=POSITIVE)
    warmup_epochs: float = _opt(0.0, "linear warm-up from 0 over this many epochs", range=minimum(0))
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy", range=FRACTION)
    max_steps_per_epoch: Optional[int] = _opt(None, "cap the steps of each epoch (smoke runs)", range=minimum(1))
    # --- loss and distillation
    loss: dict = _opt({}, "named loss terms, e.g. {ce: {weight: 0.5}, kd: {weight: 0.5, temperature: 4}}; "
                          "empty: ce alone, or for distillation the terms that the shorthands below build")
    teacher: str = _opt("", "distill: the teacher's architecture (checked against its checkpoint)")
    teacher_checkpoint: str = _opt("", "distill: the teacher checkpoint (.pth written by train-teacher); "
                                       "a run distills exactly when it has one")
    extra_teachers: list = _opt([], "distill from several teachers: these checkpoints beside teacher_checkpoint; "
                                    "every loss term that sees a teacher is computed once per teacher, each at "
                                    "its weight / the number of teachers (for kd: the gradients of KD on the "
                                    "teachers' averaged soft targets)", items=str)
    # Shorthand for `loss` (distillation): alpha * CE + (1 - alpha) * T^2 * KL [+ feature term].
    # None = not given; giving them together with `loss` in one place is an error.
    alpha: Optional[float] = _opt(None, "shorthand for `loss`: weight of the hard-label CE, KD gets 1 - alpha "
                                        "[0.5 when no loss is given]", range=("in [0, 1]", lambda v: 0 <= v <= 1))
    temperature: Optional[float] = _opt(None, "shorthand for `loss`: softmax temperature of the KD term [4.0]",
                                        range=POSITIVE)
    feature_distill: Optional[bool] = _opt(None, "shorthand for `loss`: add a FitNets feature term (MSE through "
                                                 "1x1 regressors) [off]")
    feature_weight: Optional[float] = _opt(None, "shorthand for `loss`: weight of the feature term [1.0]",
                                           range=minimum(0))
    # --- run
    seed: int = _opt(0, "seed for initialisation, data order and augmentation",
                     range=("in [0, 2**32 - 1]", lambda v: 0 <= v < 2**32))  # numpy's seeds are 32-bit
    device: str = _opt("auto", "device", DEVICES)
    precision: str = _opt("auto", "auto = bf16 autocast where the device computes bf16 natively (CUDA, CPUs with "
                                     "AVX512-BF16 or AMX), else fp32", ("auto", "fp32", "bf16", "fp16"))
    out_dir: str = _opt("models_saved", "where checkpoints and logs go")
    resume: bool = _opt(False, "continue from OUT_DIR/NAME_last.pth if it exists (a finished run: only evaluated)")
    overwrite: bool = _opt(False, "start afresh even where OUT_DIR/NAME.pth or NAME_last.pth exists (replacing them)")
    resume_changes: bool = _opt(False, "with --resume, accept options that differ from the recorded run's "
                                       "(optimizer, lr, seed, data, model...); the checkpoint then records the new ones")
    log: str = _opt("tensorboard", "where the training curves go: TensorBoard event files always (OUT_DIR/"
                                   "tensorboard/NAME); wandb or trackio beside them, where installed (optional; "
                                   "wandb offline unless WANDB_MODE is set, trackio in OUT_DIR/trackio)",
                    ("tensorboard", "wandb", "trackio"))
    progress: bool = _opt(True, "show a progress bar per epoch (only on a terminal: SLURM logs get one line per epoch)")

    def run_name(self) -> str:
        """The name checkpoints and logs are written under."""
        return self.name or self.model


FIELDS = {f.name: f for f in dataclasses.fields(Config)}

# What each number may be (declared beside each field; checked when a config is built, so a bad value fails
# before any work).
RANGES = {f.name: f.metadata["range"] for f in dataclasses.fields(Config) if f.metadata["range"]}


def check_name(value: str, source: str) -> None:
    """A run name is a file name inside --out-dir, never a path."""
    if (value in (".", "..") or any(sep in value for sep in ("/", "\\")) or value.startswith(".")
            or not value.isprintable()):
        raise UserError(f"config key 'name' in {source} must be a plain file name (no path, no leading dot, no "
                        f"control characters): got {value!r}; use --out-dir for the folder")


def _type_name(tp: Any) -> str:
    """Human name of a field type for error messages."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return f"{_type_name(args[0])} or null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false",
            list: "a list of integers", dict: "a mapping"}.get(tp, str(tp))


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _field_type(name: str, cls: type = Config) -> Any:
    return _hints(cls)[name]


def _base_type(name: str, cls: type = Config) -> Any:
    """The field's type without Optional."""
    tp = _field_type(name, cls)
    return next((a for a in typing.get_args(tp) if a is not type(None)), tp)


def field_choices(f: dataclasses.Field) -> Optional[tuple]:
    """A field's allowed values (its `choices` metadata, called if it is a function), or None."""
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def flag_name(name: str) -> str:
    """The command-line flag of a dataclass field: round_to -> --round-to."""
    return "--" + name.replace("_", "-")


def check_field(cls: type, name: str, value: Any, subject: str) -> Any:
    """Return `value` converted to field `name` of dataclass `cls`'s type, or raise a one-line UserError
    "SUBJECT must be WHAT IS ALLOWED, got VALUE": the type, the choices and the range declared beside the field.
    The one check of every dataclass-made option: its flag's (`add_dataclass_arguments`) and the dataclass's."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    tp = _field_type(name, cls)
    optional = type(None) in typing.get_args(tp)
    base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    what = "a list of paths" if base is list and f.metadata.get("items") is str else _type_name(tp)
    bad = UserError(f"{subject} must be {what}, got {value!r}")
    if value is None:
        if optional:
            return None
        raise bad
    if base is bool:
        if not isinstance(value, bool):
            raise bad
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
    elif base is str:
        if not isinstance(value, str):
            raise bad
        choices = field_choices(f)
        if choices and value not in choices:
            raise UserError(f"{subject} must be one of {', '.join(choices)}; got '{value}'")
    elif base is list:
        items = f.metadata.get("items", int)
        if not isinstance(value, list) or not all(isinstance(v, items) and not isinstance(v, bool) for v in value):
            raise bad
    elif base is dict:
        if not isinstance(value, dict):
            raise bad
        glued = [k for k, v in value.items() if v is None and isinstance(k, str) and ":" in k]
        if glued:  # YAML reads {width:4} as one key 'width:4' with no value
            raise UserError(f"{subject} has a key '{glued[0]}' without a value: write a space "
                            f"after the colon, e.g. {{{glued[0].replace(':', ': ', 1)}}}")
    allowed = f.metadata.get("range")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{subject} must be a finite number{' ' + allowed[0] if allowed else ''}, got {value}")
    if allowed and not allowed[1](value):
        raise UserError(f"{subject} must be {allowed[0]}, got {value!r}")
    return value


def check_dataclass(obj: Any) -> None:
    """Check (and convert, e.g. an int given for a float) every field of a dataclass made with `option` fields,
    naming each by its flag: what the options' __post_init__ calls, so the Python API refuses what the
    command line refuses, with the same message."""
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, check_field(type(obj), f.name, getattr(obj, f.name), flag_name(f.name)))


def check_value(name: str, value: Any, source: str) -> Any:
    """Return `value` converted to Config field `name`'s type, or raise UserError naming the key."""
    if name not in FIELDS:
        allowed = ", ".join(sorted(FIELDS))
        raise UserError(f"unknown config key '{name}' in {source}; allowed keys: {allowed}")
    value = check_field(Config, name, value, f"config key '{name}' in {source}")
    if name == "name":
        check_name(value, source)
    return value


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error instead of the last winning."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        twice = given_twice(keys)
        if twice is not None:
            raise yaml.constructor.ConstructorError(None, None, f"key '{twice}' is given twice", node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file into a dict of checked values (plain data only: safe_load)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text (is it a YAML file?)") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of keys to values")
    return {k: check_value(k, v, str(path)) for k, v in data.items()}


LOSS_SHORTHANDS = ("alpha", "temperature", "feature_distill", "feature_weight")


def merge_loss_keys(values: dict, base: Config, source: str) -> dict:
    """`values` with the loss settings of one source applied over `base`'s, by one rule.

    A source that gives `loss` replaces the whole loss (the shorthands of earlier sources are
    dropped); one that gives shorthands adds to earlier shorthands. Giving both in one source, or
    shorthands over a `loss` mapping given earlier, is an error instead of one silently winning.
    """
    given = [k for k in LOSS_SHORTHANDS if values.get(k) is not None]
    if values.get("loss") and given:
        raise UserError(f"{source} gives both 'loss' and {', '.join(repr(k) for k in given)}: alpha, temperature, "
                        "feature_distill and feature_weight are shorthand that build `loss`; give one or the other")
    if values.get("loss"):
        return {**values, **{k: None for k in LOSS_SHORTHANDS}}
    if given and base.loss:
        raise UserError(f"{', '.join(repr(k) for k in given)} in {source} would change a loss given as the mapping "
                        f"`loss` earlier (in a YAML file or recipe); give the whole loss with --loss instead")
    return values


def check_config(cfg: Config) -> None:
    """Settings that one another make meaningless (a flag the run would ignore) are errors, before any work."""
    # (momentum without sgd and milestones without multistep are checked only where the user typed them,
    # in check_typed_flags: a recipe sets them for its own schedule, which a flag may change)
    unused = []
    if cfg.channels is not None and cfg.dataset != "imagefolder":
        unused.append(f"channels {cfg.channels} (only imagefolder reads it; {cfg.dataset} has its own)")
    if cfg.image_size is not None and cfg.dataset not in IMAGE_SIZE_DATASETS:
        unused.append(f"image_size {cfg.image_size} ({cfg.dataset} has a fixed size; models that want another "
                      "resize on the device)")
    if cfg.resume_changes and not cfg.resume:
        unused.append("resume_changes (it applies to --resume only)")
    if unused:
        raise UserError(f"config sets {unused[0]}: leave it out")
    if cfg.log != "tensorboard" and importlib.util.find_spec(cfg.log) is None:
        raise UserError(f"log {cfg.log} needs the {cfg.log} package, which is not installed: pip install {cfg.log} "
                        "(optional; the TensorBoard curves are written without it)")
    if cfg.labelled_subset is not None and cfg.train_subset is not None and cfg.labelled_subset > cfg.train_subset:
        raise UserError(f"labelled_subset {cfg.labelled_subset} is more than train_subset {cfg.train_subset}: "
                        "it counts labelled examples among the training subset")


def make_config(values: dict, source: str = "overrides", base: Optional[Config] = None) -> Config:
    """A Config from `base` (or the defaults) with `values` applied after checking them."""
    base = base or Config()
    checked = {k: check_value(k, v, source) for k, v in values.items()}
    cfg = dataclasses.replace(base, **merge_loss_keys(checked, base, source))
    if checked.get("resume") and checked.get("overwrite"):
        raise UserError(f"{source} gives both resume and overwrite: continue the run, or start it afresh")
    return cfg


# ---------------------------------------------------------------- command line
def _parse_cli_value(name: str, text: str, cls: type = Config) -> Any:
    """Parse one command-line string into a value for field `name` (YAML syntax for lists/dicts)."""
    tp = _field_type(name, cls)
    base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    if base is str:  # a string is taken as typed (an --output named "none" is a file name)
        return text
    if text.lower() in ("none", "null") and type(None) in typing.get_args(tp):
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if base is float and isinstance(value, str):  # YAML reads "5e-4" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return value


def _int_or_none(text: str) -> Optional[int]:
    """One item of a list flag: an integer, or none (which clears the list)."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer (give integers, or none to clear the list)") from None


def _str_or_none(text: str) -> Optional[str]:
    """One item of a list of strings: the text, or none (which clears the list)."""
    return None if text.lower() in ("none", "null") else text


def _cleared_list(values: list, flag: str) -> list:
    """A list flag's items; `none` alone is the empty list."""
    if None in values:
        if len(values) > 1:
            raise UserError(f"{flag} takes integers, or none alone to clear the list; got {' '.join('none' if v is None else str(v) for v in values)}")
        return []
    return values


class _Checked(argparse.Action):
    """Stores a flag's value after `check(value, the flag as typed)`: bad values are refused while parsing."""

    def __init__(self, *args: Any, check: Callable[[Any, str], Any], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.check = check

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, self.check(values, option_string or flag_name(self.dest)))


def shown_default(f: dataclasses.Field, value: Any) -> str:
    """What --help shows as a field's default: its `shown_default` words where given, else the value."""
    return f.metadata.get("shown_default") or str(value)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple = (),
                            only: Optional[tuple] = None, title: Optional[str] = None, defaults: Any = None,
                            negatable: bool = True,
                            check: Optional[Callable[[str, Any, str], Any]] = None) -> argparse._ActionsContainer:
    """Add one --flag per field of dataclass `cls` made with `option` (its aliases, help text, allowed values and
    range, and the default that --help shows: `defaults`' value where given, else the field's own); `only` picks
    fields, `skip` leaves some out. A field without a default is a required flag. Values are parsed like YAML
    and checked while parsing by `check(name, value, flag)` (default: `check_field`, naming the flag typed), the
    check the dataclass itself makes. Flags not given stay out of the namespace, so the dataclass's defaults
    apply. Booleans: --x/--no-x (`negatable`), or a plain switch --x. Returns the group the flags are in."""
    group = parser.add_argument_group(title) if title else parser
    check = check or (lambda name, value, flag: check_field(cls, name, value, flag))
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        flags = [flag_name(f.name), *f.metadata.get("aliases", ())]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        help_text = f.metadata["help"]
        if not required:
            default = getattr(defaults, f.name) if defaults is not None else \
                (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            help_text += f" [default: {shown_default(f, default)}]"
        if field_choices(f):
            help_text += f" (one of: {', '.join(field_choices(f))})"
        if f.metadata.get("range"):
            help_text += f" ({f.metadata['range'][0]})"
        common = dict(dest=f.name, help=help_text,
                      **({"required": True} if required else {"default": argparse.SUPPRESS}))
        checked = lambda value, flag, n=f.name: check(n, value, flag)  # noqa: E731
        if _base_type(f.name, cls) is bool:
            action = argparse.BooleanOptionalAction if negatable else "store_true"
            group.add_argument(*flags, action=action, **common)
        elif _base_type(f.name, cls) is list:  # `--keep-layers none` clears a list a recipe sets
            cleared = lambda value, flag, n=f.name: check(n, _cleared_list(value, flag), flag)  # noqa: E731
            strings = f.metadata.get("items", int) is str
            group.add_argument(*flags, nargs="+", type=_str_or_none if strings else _int_or_none,
                               metavar="PATH" if strings else "N", action=_Checked, check=cleared, **common)
        else:
            group.add_argument(*flags, metavar=f.metadata.get("metavar") or "VALUE", action=_Checked, check=checked,
                               type=lambda t, n=f.name: _parse_cli_value(n, t, cls), **common)
    return group


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple = (), only: Optional[tuple] = None,
                         title: str = "config (override the YAML; defaults shown)",
                         defaults: Optional[Config] = None) -> None:
    """Add one --flag per Config field (its help text, allowed values and the default that `--help` shows:
    `defaults`' value, e.g. the command's recipe, else the built-in one); `only` picks fields."""
    add_dataclass_arguments(parser, Config, skip, only, title, defaults or Config(),
                            check=lambda name, value, flag: check_value(name, value, "command line"))


def config_from_args(args: argparse.Namespace, yaml_path: Optional[str], defaults: Optional[dict] = None) -> Config:
    """Resolve defaults < `defaults` < YAML < command line into one checked Config."""
    cfg = make_config(defaults or {}, "built-in defaults")
    if yaml_path:
        cfg = make_config(load_yaml(yaml_path), str(yaml_path), base=cfg)
    overrides = {k: v for k, v in vars(args).items() if k in FIELDS}
    cfg = make_config(overrides, "command line", base=cfg)
    check_typed_flags(cfg, overrides)
    return cfg


def check_typed_flags(cfg: Config, typed: dict) -> None:
    """Flags the user typed that the resolved run would not use are errors (recipes may set them freely)."""
    unused = []
    if "momentum" in typed and cfg.optimizer != "sgd":
        unused.append(f"--momentum (only sgd uses it; the optimizer is {cfg.optimizer})")
    unused += [f"--{k} (only the multistep schedule uses it; the schedule is {cfg.scheduler})"
               for k in ("milestones", "gamma") if k in typed and cfg.scheduler != "multistep"]
    if "data_dir" in typed and cfg.dataset in NO_DATA_DIR_DATASETS:
        unused.append(f"--data-dir ({cfg.dataset} ships inside a package and reads no folder)")
    if unused:
        raise UserError(f"command line gives {unused[0]}: leave it out")


def to_dict(cfg: Config) -> dict:
    """The config as plain data (what checkpoints store)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict, source: str) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. from a checkpoint)."""
    data = {k: v for k, v in data.items() if k in FIELDS}
    if data.get("loss"):  # a recorded loss is the one that ran; older checkpoints also kept the shorthands
        data.update({k: None for k in LOSS_SHORTHANDS})
    return make_config(data, source)
