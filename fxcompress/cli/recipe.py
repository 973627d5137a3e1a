"""A recipe: one YAML file naming the model, the data set, the passes in order and the fine-tuning after
each. `load_recipe` validates all of it before any work and reports a bad key or value at its line.

    model: zoo:lenet300            # zoo:NAME, torchvision:NAME, transformers:ClassName or package.module:factory
    data: digits                   # or {name: cifar-10, root: DIR, channels: 3}; image_size: image-folder only
    train: {epochs: 30, lr: 1e-3}  # dense training first (optional)
    calibration: {batches: 4, batch_size: 128}   # the data set's first training images; at most all of them
    steps:
      - pass: InsertMasks
        config: {sparsity: 0.8, scope: global}
        finetune: {epochs: 8, lr: 5e-4, distill: {temperature: 4.0, alpha: 0.9}}
      - pass: InsertFakeQuant
        config: {bits: 5, method: kmeans}
        finetune: {epochs: 4, lr: 0.01, optimizer: sgd, momentum: 0.9, nesterov: true,
                   weight_decay: 1e-5, schedule: cosine}   # or adam / adamw; schedule constant / step
      - pass: LowerToEncoded
    quick: {epochs: 1, train_samples: 512}   # what --quick caps
    sensitivity: {sparsities: [0.5, 0.9]}    # the report's curves of the dense model (or `true`)

The keys each section takes, and what each value must be, are the tables below (constraints of
fxcompress.config, as the passes declare theirs); a pass's own config is checked by the pass itself,
the optimizer keys (optimizer, momentum, nesterov, weight_decay, schedule, step_epochs, gamma) by
fxcompress.training.OptimizerConfig. Each fine-tuning starts a fresh optimizer and schedule.

A shipped recipe (fxcompress/recipes/NAME.yaml, package data) is found by its NAME.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import passes as passes_module
from ..config import Boolean, Interval, Options, Regex, TypeOf, explain, satisfies
from ..errors import ConfigError
from ..pass_base import Pass
from ..passes import ActivationConfig
from ..pruning.importance import GRANULARITIES
from ..pruning.schedule import AGP
from ..training import OptimizerConfig
from .data import DATASETS
from .yamldoc import Document, dotted, read

PASSES: dict[str, type[Pass]] = {name: getattr(passes_module, name) for name in passes_module.__all__
                                 if isinstance(getattr(passes_module, name), type)
                                 and issubclass(getattr(passes_module, name), Pass)}
# pass fields that take a configuration object: in a recipe they are written as its keyword mapping
NESTED: dict[tuple[str, str], type] = {("InsertMasks", "schedule"): AGP,
                                       ("InsertFakeQuant", "activations"): ActivationConfig}

_TEXT = TypeOf(str, what="a string")
_MAP = TypeOf(dict, what="a mapping")
_COUNT = Interval(int, 0)
_POSITIVE = Interval(int, 1)
# section -> {key: alternatives}; a key missing from its table is refused
# the optimizer's keys are OptimizerConfig's fields, checked by its own constraints (then as a whole by it)
TRAIN = {"epochs": (_COUNT,), "lr": (Interval(float, 0.0, lo_open=True),), "batch_size": (_POSITIVE,),
         **OptimizerConfig.constraints}
FINETUNE = {**TRAIN, "distill": (Boolean(), _MAP)}
DISTILL = {"temperature": (Interval(float, 0.0, lo_open=True),), "alpha": (Interval(float, 0.0, 1.0),)}
DATA = {"name": (Options(*DATASETS),), "root": (_TEXT,), "channels": (_POSITIVE,), "image_size": (Interval(int, 4),)}
CALIBRATION = {"batches": (_POSITIVE,), "batch_size": (_POSITIVE,)}
QUICK = {"epochs": (_COUNT,), "train_samples": (_POSITIVE,), "test_samples": (_POSITIVE,)}
STEP = {"pass": (Options(*PASSES),), "name": (_TEXT,), "config": (_MAP,), "finetune": (_MAP,)}
TOP = {"description": (_TEXT,), "model": (_TEXT,), "model_args": (_MAP,), "data": (_TEXT, _MAP),
       "seed": (_COUNT,), "threads": (_POSITIVE,), "train": (_MAP,), "calibration": (_MAP,),
       "steps": (TypeOf(list, what="a list of steps"),), "quick": (_MAP,), "sensitivity": (Boolean(), _MAP)}
# the report's sensitivity curves of the trained dense model (fxcompress.sensitivity), when asked for
SENSITIVITY = {"sparsities": (TypeOf(list, what="a list of sparsities in [0, 1]"),),
               "granularity": (Options(*GRANULARITIES),), "layers": (Regex(),)}
OPTIMIZER_KEYS = tuple(f.name for f in dataclasses.fields(OptimizerConfig))
SHIPPED = Path(__file__).resolve().parents[1] / "recipes"  # package data: fxcompress/recipes/*.yaml
REQUIRED = {"top": ("model", "data", "steps"), "step": ("pass",), "data": ("name",)}
DEFAULTS = {"train": {"epochs": 0, "lr": 1e-3, "batch_size": 64},
            "calibration": {"batches": 4, "batch_size": 128},
            "quick": {"epochs": 1, "train_samples": 512, "test_samples": 360},
            "sensitivity": {"sparsities": [0.5, 0.7, 0.8, 0.9, 0.95], "granularity": "element", "layers": None}}


@dataclass(frozen=True)
class Training:
    epochs: int
    lr: float
    batch_size: int
    optimizer: OptimizerConfig = OptimizerConfig()
    distill: dict | None = None  # {"temperature", "alpha"}: the dense model teaches


@dataclass(frozen=True)
class Step:
    index: int
    name: str
    make: Any  # () -> a fresh Pass (a pass with a schedule keeps no state, but each run gets its own)
    finetune: Training | None
    fingerprint: str  # of everything this step's result depends on: a changed recipe reruns from there


@dataclass(frozen=True)
class Recipe:
    doc: Document
    model: str
    model_args: dict
    data: dict
    seed: int
    threads: int
    train: Training
    calibration: dict
    quick: dict
    steps: tuple[Step, ...]
    fingerprint: str  # of what the dense model depends on: model, data, seed, dense training, quick caps
    sensitivity: dict | None = None  # {"sparsities", "granularity", "layers"}: the report's curves

    def error(self, path: tuple, message: str) -> ConfigError:
        return self.doc.error(path, message)


def check_section(doc: Document, path: tuple, value: Any, table: dict, required: tuple = ()) -> dict:
    """`value` must be a mapping whose keys are in `table` and whose values satisfy it."""
    if not isinstance(value, dict):
        raise doc.error(path, f"{dotted(path)} must be a mapping, got {value!r}")
    for key, item in value.items():
        if key not in table:
            raise doc.error(path + (key,), f"unknown key {dotted(path + (key,))}; "
                                           f"{dotted(path)} takes {', '.join(table)}")
        if not satisfies(item, table[key]):
            raise doc.error(path + (key,), explain(dotted(path + (key,)), item, table[key]))
    for key in required:
        if key not in value:
            raise doc.error(path, f"{dotted(path)} needs the key {key!r}")
    return value


def _training(doc: Document, path: tuple, value: dict | None, base: dict) -> Training | None:
    if value is None:
        return None
    settings = {**base, **check_section(doc, path, value, FINETUNE if path != ("train",) else TRAIN)}
    distill = settings.pop("distill", False)
    if isinstance(distill, dict):
        distill = {"temperature": 4.0, "alpha": 0.9,
                   **check_section(doc, path + ("distill",), distill, DISTILL)}
    chosen = {key: settings.pop(key) for key in OPTIMIZER_KEYS if key in settings}
    try:
        optimizer = OptimizerConfig(**chosen)
    except ConfigError as exc:  # a key the chosen optimizer or schedule does not read: reported at that key
        culprit = next((key for key in re.findall(r"OptimizerConfig\.(\w+)", str(exc)) if key in value), None)
        raise doc.error(path + ((culprit,) if culprit else ()), f"{dotted(path)}: {exc}") from None
    return Training(**settings, optimizer=optimizer, distill=distill or None)


def _sensitivity(doc: Document, value: Any) -> dict | None:
    if value is None or value is False:
        return None
    settings = {**DEFAULTS["sensitivity"],
                **(check_section(doc, ("sensitivity",), value, SENSITIVITY) if isinstance(value, dict) else {})}
    sparsities = settings["sparsities"]
    if not sparsities or not all(satisfies(s, (Interval(float, 0.0, 1.0),)) for s in sparsities):
        raise doc.error(("sensitivity", "sparsities"), f"sensitivity.sparsities must be a non-empty list of "
                                                       f"numbers in [0, 1], got {sparsities!r}")
    return {**settings, "sparsities": tuple(float(s) for s in sparsities)}


def _pass_value(doc: Document, path: tuple, owner: str, field: str, value: Any) -> Any:
    """A recipe value as the pass field takes it: lists as tuples, nested configs built from mappings."""
    nested = NESTED.get((owner, field))
    if nested is not None and isinstance(value, dict):
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(nested)})
        if unknown:
            raise doc.error(path + (unknown[0],), f"unknown key {dotted(path + (unknown[0],))}; "
                                                  f"{nested.__name__} takes "
                                                  f"{', '.join(f.name for f in dataclasses.fields(nested))}")
        return nested(**{k: _pass_value(doc, path + (k,), nested.__name__, k, v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_pass_value(doc, path + (i,), owner, field, v) for i, v in enumerate(value))
    return value


def _make_pass(doc: Document, path: tuple, name: str, config: dict):
    """A factory of the configured pass, tried once now so that a bad config fails here, at its line."""
    cls = PASSES[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in config:
        if key not in fields:
            raise doc.error(path + (key,), f"unknown key {dotted(path + (key,))}; {name} takes "
                                           f"{', '.join(fields) or 'no options'}")

    def make() -> Pass:
        return cls(**{k: _pass_value(doc, path + (k,), name, k, v) for k, v in config.items()})

    try:
        make()
    except ConfigError as exc:
        raise doc.error(_culprit(path, config, str(exc)), f"{dotted(path)}: {exc}") from None
    return make


def _culprit(path: tuple, config: dict, message: str) -> tuple:
    """The config key a pass's ConfigError names (`InsertMasks.sparsity`, `AGP.end` under `schedule`)."""
    for owner, field in re.findall(r"\b(\w+)\.(\w+)", message):
        if field in config:
            return path + (field,)
        for key, value in config.items():
            if isinstance(value, dict) and field in value:
                return path + (key, field)
    return path


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def _steps(doc: Document, items: list, base: tuple) -> tuple[Step, ...]:
    if not items:
        raise doc.error(("steps",), "steps is empty: a recipe needs at least one pass")
    steps = []
    for index, item in enumerate(items):
        path = ("steps", index)
        check_section(doc, path, item, STEP, REQUIRED["step"])
        make = _make_pass(doc, path + ("config",), item["pass"], item.get("config", {}))
        finetune = _training(doc, path + ("finetune",), item.get("finetune"), DEFAULTS["train"])
        steps.append(Step(index, item.get("name", f"{index + 1}-{item['pass']}"), make, finetune,
                          _fingerprint(base, items[:index + 1])))
    return tuple(steps)


def shipped_recipes() -> dict[str, Path]:
    """The recipes shipped with the package: name -> file."""
    return {path.stem: path for path in sorted(SHIPPED.glob("*.yaml"))}


def find_recipe(spec: str | Path) -> Path:
    """A recipe file: `spec` itself when it is a file, else the shipped recipe of that name."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    name = path.stem if path.suffix in (".yaml", ".yml") else path.name
    if path.parent != Path("."):
        raise ConfigError(f"{path}: cannot read the recipe (no such file)")
    if name in shipped:
        return shipped[name]
    raise ConfigError(f"no recipe file {str(spec)!r} and no shipped recipe of that name "
                      f"(shipped: {', '.join(shipped) or 'none'})")


def _model_args(folder: Path, model: str, args: dict) -> tuple[dict, str | None]:
    """The model's arguments, a transformers `config:` file named relative to the recipe read from the
    recipe's folder, and a digest of that file: a changed config file changes the dense model."""
    args = dict(args)
    path = args.get("config")
    if not (model.startswith("transformers:") and isinstance(path, str)):
        return args, None
    beside = folder / path
    if not Path(path).is_absolute() and beside.is_file():
        args["config"] = str(beside)
    file = Path(args["config"])
    return args, hashlib.sha256(file.read_bytes()).hexdigest()[:16] if file.is_file() else None


def load_recipe(path: str | Path, quick: bool = False) -> Recipe:
    """Read and validate a recipe (a file, or the name of a shipped one); every error is a ConfigError
    "file:line: what is wrong"."""
    file = find_recipe(path)
    doc = read(file)
    top = check_section(doc, (), doc.data if doc.data is not None else {}, TOP, REQUIRED["top"])
    data = top["data"] if isinstance(top["data"], dict) else {"name": top["data"]}
    check_section(doc, ("data",), data, DATA, REQUIRED["data"])
    ignored = DATASETS[data["name"]].why_not_resized(data["name"])
    if "image_size" in data and ignored:
        raise doc.error(("data", "image_size"), f"data.image_size: {ignored}")
    calibration = {**DEFAULTS["calibration"], **check_section(doc, ("calibration",), top.get("calibration", {}),
                                                              CALIBRATION)}
    quick_caps = {**DEFAULTS["quick"], **check_section(doc, ("quick",), top.get("quick", {}), QUICK)}
    train = _training(doc, ("train",), top.get("train", {}), DEFAULTS["train"])
    model_args, config_digest = _model_args(file.parent, top["model"], top.get("model_args", {}))
    base = (top["model"], top.get("model_args", {}), data, top.get("seed", 0), top.get("train"), calibration,
            quick and quick_caps) + ((config_digest,) if config_digest else ())
    return Recipe(doc, top["model"], model_args, data, top.get("seed", 0),
                  top.get("threads", 1), train, calibration, quick_caps if quick else {},
                  _steps(doc, top["steps"], base), _fingerprint(base), _sensitivity(doc, top.get("sensitivity")))
