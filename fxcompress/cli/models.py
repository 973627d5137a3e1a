"""Models a recipe can name: `zoo:NAME` (fxcompress.zoo), `torchvision:NAME`, `package.module:factory`,
or `transformers:ClassName` (a Hugging Face image classifier built from a config, nothing downloaded).

A factory's keyword arguments come from the recipe's `model_args`; those it accepts by the names in
`FROM_DATA` and the recipe leaves out are filled from the data set (a LeNet on 8x8 digits gets
`in_features=64`), so one zoo entry serves every data set. A transformers class takes its config's
keywords as `model_args` (or `{config: file.json}`), and the data set fills the config fields of
`HF_FROM_DATA` the recipe leaves out.
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, MissingDependencyError, TraceError
from ..execution import evaluating
from ..zoo import ZOO

# factory keyword -> what of the data set's shape it receives
FROM_DATA: dict[str, Callable[[int, int, int], int]] = {
    "in_features": lambda channels, side, classes: channels * side * side,
    "in_channels": lambda channels, side, classes: channels,
    "image_size": lambda channels, side, classes: side,
    "num_classes": lambda channels, side, classes: classes,
}
# config field of a Hugging Face image classifier -> what of the data set's shape it receives
HF_FROM_DATA: dict[str, Callable[[int, int, int], int]] = {
    "num_channels": lambda channels, side, classes: channels,
    "image_size": lambda channels, side, classes: side,
    "num_labels": lambda channels, side, classes: classes,
}
TRANSFORMERS = "transformers:"
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _zoo(name: str) -> Callable[..., nn.Module]:
    if name not in ZOO:
        raise ConfigError(f"unknown zoo model {name!r}; the zoo has {', '.join(sorted(ZOO))}")
    return ZOO[name][0]


def _torchvision(name: str) -> Callable[..., nn.Module]:
    try:
        import torchvision
    except ImportError as exc:
        raise MissingDependencyError(f"model torchvision:{name} needs torchvision: "
                                     "pip install 'fxcompress[vision]'") from exc
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise ConfigError(f"unknown torchvision model {name!r} (torchvision has {len(names)}, e.g. resnet18)")
    return lambda **kwargs: torchvision.models.get_model(name, weights=None, **kwargs)


def _import(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model {spec!r}: cannot import {module_name!r} ({exc})") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(f"model {spec!r}: {module_name} has no callable {attribute!r}")
    return factory


class LogitsOf(nn.Module):
    """A Hugging Face classifier seen as an image -> logits module: its forward returns a ModelOutput,
    which the recipe's training loss, evaluation and the verifying compile cannot use as a tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values=pixel_values).logits


def transformers_class(name: str) -> type:
    """The transformers model class `name`: an image classifier (its forward takes pixel_values)."""
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(f"model transformers:{name} needs transformers: "
                                     "pip install 'fxcompress[llm]'") from exc
    try:
        cls = getattr(transformers, name, None) if name.isidentifier() else None
    except (ImportError, RuntimeError) as exc:  # a class whose own backend is missing
        raise ConfigError(f"model transformers:{name} cannot be imported ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and getattr(cls, "config_class", None)):
        raise ConfigError(f"unknown transformers model class {name!r} (e.g. ViTForImageClassification)")
    if "pixel_values" not in inspect.signature(cls.forward).parameters:
        raise ConfigError(f"model transformers:{name} takes no pixel_values: a recipe's data are images, "
                          "so only image classifiers such as ViTForImageClassification fit")
    return cls


def _config_fields(config_class: type) -> set[str]:
    """Every field the config class knows: its keywords, its defaults' keys, and num_labels (a property)."""
    fields = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    return fields | set(config_class().to_dict()) | {"num_labels"}


def _hf_config(spec: str, cls: type, args: dict[str, Any], shape: tuple[int, int, int] | None):
    """The model's config from the keywords or the local JSON file in `args`, with the data set's shape
    in the fields of HF_FROM_DATA the recipe leaves out. A typo'd keyword is refused: transformers would
    keep it as an attribute nobody reads."""
    config_class, given = cls.config_class, dict(args)
    known = _config_fields(config_class)
    path = given.pop("config", None)
    if path is not None and given:
        raise ConfigError(f"model {spec!r}: model_args takes config: FILE or the config's keywords, not both "
                          f"(also given: {', '.join(sorted(given))})")
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"model {spec!r}: {config_class.__name__} has no field {unknown[0]!r}")
    if path is not None:
        given = _read_config_file(spec, config_class, path)
        config = config_class.from_json_file(str(path))
    else:
        config = config_class(**given)
    present = set(given) | ({"num_labels"} if "id2label" in given else set())
    for key, rule in HF_FROM_DATA.items():
        if shape is not None and key in known and key not in present:
            setattr(config, key, rule(*shape))
    return config


def _read_config_file(spec: str, config_class: type, path: Any) -> dict:
    """The keys a local config file sets; a name that is no file (a hub id) is refused, nothing downloads."""
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        raise ConfigError(f"model {spec!r}: config {str(path)!r} is not a local file; nothing is downloaded "
                          f"(write the {config_class.__name__} to a JSON file and name that)")
    try:
        given = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model {spec!r}: config {str(path)!r} is not a JSON config ({exc})") from None
    if not isinstance(given, dict):
        raise ConfigError(f"model {spec!r}: config {str(path)!r} holds no mapping of config fields")
    return given


def build_transformers(spec: str, args: dict[str, Any], shape: tuple[int, int, int] | None) -> LogitsOf:
    """`transformers:ClassName` with random weights from its config, wrapped to return the logits."""
    cls = transformers_class(spec[len(TRANSFORMERS):])
    try:
        model = cls(_hf_config(spec, cls, args, shape))
    except ConfigError:
        raise
    except Exception as exc:  # transformers raises many types on a bad value (KeyError for an unknown
        # activation, ZeroDivisionError for patch_size 0, its own validation errors): each becomes one
        raise ConfigError(f"model {spec!r} could not be built from its config ({type(exc).__name__}: "
                          f"{_first_line(exc)})") from None
    return LogitsOf(model)


def export_free_batch(model: LogitsOf, example_inputs: tuple) -> torch.export.ExportedProgram:
    """The classifier exported in eval mode with a free batch size. compile's own export frees the batch
    where export can and keeps the example's where it cannot; fine-tuning and evaluation here run other
    batch sizes, so a batch export cannot free (a ViT expanding its class token to a fixed batch) is a
    TraceError here. Dropout is not in the exported graph, so fine-tuning runs without it."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        with evaluating(model):
            return torch.export.export(model, example_inputs, dynamic_shapes=({0: batch},), strict=False)
    except Exception as exc:  # torch.export raises many types; each becomes one typed error
        raise TraceError(f"torch.export could not export {type(model.model).__name__} with a free batch "
                         f"size: {_first_line(exc)}") from exc


def computes_with(program: torch.export.ExportedProgram, model: nn.Module) -> bool:
    """Whether `program`, an export of `model`, still computes with `model`'s own tensors: torch.export
    keeps the module's parameter and buffer objects, so values the model's training wrote in place since
    the export are the program's too, and exporting the trained model again would give the same program.
    False as soon as one tensor was replaced (assigned anew, not updated in place) or the names differ."""
    own = model.state_dict(keep_vars=True)
    held = program.state_dict
    if held.keys() != own.keys() or any(held[name] is not own[name] for name in held):
        return False
    buffers = dict(model.named_buffers(remove_duplicate=False))  # non-persistent ones are program constants
    return all(value is buffers[name] for name, value in program.constants.items() if name in buffers)


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def factory_of(spec: Any) -> Callable[..., nn.Module]:
    """The callable a model spec names; ConfigError for a spec of no known form or an unknown name."""
    if not isinstance(spec, str):
        raise ConfigError(f"model must be a string such as zoo:lenet300, torchvision:resnet18, "
                          f"transformers:ViTForImageClassification or package.module:factory, got {spec!r}")
    if spec.startswith("zoo:"):
        return _zoo(spec[4:])
    if spec.startswith("torchvision:"):
        return _torchvision(spec[len("torchvision:"):])
    if spec.startswith(TRANSFORMERS):
        transformers_class(spec[len(TRANSFORMERS):])  # refused now when missing or unknown
        return lambda **config: build_transformers(spec, config, None)
    if _FACTORY.match(spec):
        return _import(spec)
    raise ConfigError(f"model {spec!r} is not zoo:NAME, torchvision:NAME or package.module:factory "
                      f"(nor transformers:ClassName)")


def build(spec: str, args: dict[str, Any], shape: tuple[int, int, int]) -> nn.Module:
    """The model, with the data set's (channels, side, classes) for the keywords in FROM_DATA it takes."""
    if isinstance(spec, str) and spec.startswith(TRANSFORMERS):
        return build_transformers(spec, args, shape)
    factory = factory_of(spec)
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepted = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    filled = {key: rule(*shape) for key, rule in FROM_DATA.items()
              if key not in args and (key in accepted or (takes_any and key == "num_classes"))}
    try:
        model = factory(**filled, **args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model {spec!r} could not be built with {dict(filled, **args)} ({exc})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model
