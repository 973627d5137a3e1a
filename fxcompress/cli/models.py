"""Models a recipe can name: `zoo:NAME` (fxcompress.zoo), `torchvision:NAME`, or `package.module:factory`.

A factory's keyword arguments come from the recipe's `model_args`; those it accepts by the names in
`FROM_DATA` and the recipe leaves out are filled from the data set (a LeNet on 8x8 digits gets
`in_features=64`), so one zoo entry serves every data set.
"""
from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import ConfigError, MissingDependencyError
from ..zoo import ZOO

# factory keyword -> what of the data set's shape it receives
FROM_DATA: dict[str, Callable[[int, int, int], int]] = {
    "in_features": lambda channels, side, classes: channels * side * side,
    "in_channels": lambda channels, side, classes: channels,
    "image_size": lambda channels, side, classes: side,
    "num_classes": lambda channels, side, classes: classes,
}
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


def factory_of(spec: Any) -> Callable[..., nn.Module]:
    """The callable a model spec names; ConfigError for a spec of no known form or an unknown name."""
    if not isinstance(spec, str):
        raise ConfigError(f"model must be a string such as zoo:lenet300, torchvision:resnet18 or "
                          f"package.module:factory, got {spec!r}")
    if spec.startswith("zoo:"):
        return _zoo(spec[4:])
    if spec.startswith("torchvision:"):
        return _torchvision(spec[len("torchvision:"):])
    if _FACTORY.match(spec):
        return _import(spec)
    raise ConfigError(f"model {spec!r} is not zoo:NAME, torchvision:NAME or package.module:factory")


def build(spec: str, args: dict[str, Any], shape: tuple[int, int, int]) -> nn.Module:
    """The model, with the data set's (channels, side, classes) for the keywords in FROM_DATA it takes."""
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
