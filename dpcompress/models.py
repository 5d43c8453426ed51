"""Model specs: ``torchvision:NAME[?k=v&...]``, ``timm:NAME[?k=v&...]``, ``path/to/file.py:factory``,
``package.module:factory``."""

from __future__ import annotations

import ast
import importlib
import inspect
import importlib.util
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from dpcompress.errors import UserError


def parse_spec(spec: str) -> Tuple[str, str, Dict[str, Any]]:
    """Split a spec into (source, factory, keyword arguments).

    Keyword values are Python literals where they parse as one (``width_mult=1.4``,
    ``num_classes=10``) and strings otherwise.
    """
    base, _, query = spec.partition("?")
    source, sep, factory = base.rpartition(":")
    if not sep or not source or not factory:
        raise UserError(f"model spec {spec!r} must look like torchvision:NAME, timm:NAME, path/to/file.py:factory "
                        "or package.module:factory")
    kwargs: Dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise UserError(f"model spec {spec!r}: keyword argument {item!r} must look like name=value")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return source, factory, kwargs


def _torchvision_factory(name: str) -> Callable[..., Any]:
    from dpcompress.tv_compat import import_torchvision

    models = import_torchvision().models
    known = set(models.list_models())  # classification, detection, segmentation, video, ...
    if name not in known:
        close = sorted(n for n in known if n.startswith(name[:4]))[:6]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UserError(f"unknown torchvision model {name!r}{hint}; see torchvision.models.list_models()")
    return models.get_model_builder(name)


def _timm_factory(name: str) -> Callable[..., Any]:
    from dpcompress.tv_compat import import_torchvision

    import_torchvision()  # timm imports torchvision: its missing op schemas must be defined first
    try:
        import timm
    except ImportError:
        raise UserError("timm: specs need the timm package; pip install 'dpcompress[timm]' (or pip install timm)") \
            from None
    if not timm.is_model(name):
        close = timm.list_models(f"{name[:4]}*")[:6]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UserError(f"unknown timm model {name!r}{hint}; see timm.list_models()")

    def factory(**kwargs: Any) -> Any:
        kwargs.setdefault("pretrained", False)  # random weights unless --weights: nothing is downloaded
        return timm.create_model(name, **kwargs)

    return factory


def _file_factory(path: str, name: str) -> Callable[..., Any]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"model file {path} does not exist")
    module_name = f"dpcompress_user_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's file failed at import: say where
        raise UserError(f"importing {path} failed: {type(err).__name__}: {err}") from err
    return _attribute(module, name, path)


def _module_factory(module_name: str, name: str) -> Callable[..., Any]:
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"cannot import module {module_name!r}: {err}") from err
    return _attribute(module, name, module_name)


def _attribute(module: Any, name: str, where: str) -> Callable[..., Any]:
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UserError(f"{where} has no callable {name!r} (the part after ':' must name a model factory)")
    return factory


def build_model(spec: str, weights: Optional[str] = None) -> Any:
    """Build the model a spec names, load ``weights`` (a state_dict file) if given, in eval mode."""
    import torch

    source, name, kwargs = parse_spec(spec)
    if source == "torchvision":
        factory = _torchvision_factory(name)
        if "weights_backbone" in inspect.signature(factory).parameters:
            kwargs.setdefault("weights_backbone", None)  # detection builders default to downloading it
    elif source == "timm":
        factory = _timm_factory(name)
    elif source.endswith(".py"):
        factory = _file_factory(source, name)
    else:
        factory = _module_factory(source, name)
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise UserError(f"building {spec!r} failed: {err}") from err
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


SAVE_HINT = "save one with torch.save(model.state_dict(), PATH)"


def load_weights(model: Any, path: str) -> None:
    """Load a state_dict (or a checkpoint dict holding one under 'state_dict'/'model') into ``model``.

    Anything else ends in one line naming what the file holds: torch's own messages for a
    foreign file run over several lines and suggest unsafe loading.
    """
    import torch

    if not Path(path).is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the pickle protocol of files it did not write
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged or foreign file
        raise UserError(f"weights file {path} cannot be read as a state_dict ({_load_failure(err)}); "
                        f"{SAVE_HINT}") from err
    state = _state_dict_in(loaded)
    if state is None:
        held = "a dict with no tensors" if isinstance(loaded, dict) else f"a {type(loaded).__name__}"
        raise UserError(f"weights file {path} holds {held}, not a state_dict; {SAVE_HINT}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"weights {path} do not fit the model: {first}") from err


def _state_dict_in(loaded: Any) -> Optional[Dict[str, Any]]:
    """``loaded`` if it is a dict of tensors, else a dict of tensors under its 'state_dict' or 'model' key."""
    candidates = [loaded]
    if isinstance(loaded, dict):
        candidates += [loaded.get("state_dict"), loaded.get("model")]
    for candidate in candidates:
        if isinstance(candidate, dict) and any(hasattr(v, "shape") for v in candidate.values()):
            return candidate
    return None


def _load_failure(err: Exception) -> str:
    """One line for why ``torch.load(weights_only=True)`` failed."""
    if isinstance(err, pickle.UnpicklingError):
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        return f"it pickles {found.group(1)}" if found else "it pickles Python objects, not only tensors"
    return f"not a file written by torch.save: {type(err).__name__}"
