"""Model weights per checkpoint (safetensors, never pickle) and the factory that rebuilds a model.

A store records a model as an importable factory ("package.module:callable") plus JSON keyword
arguments, so the shell can replay samples at a checkpoint without the training script.

A store is data: it may come from anyone. Its factory string names code, so MetaQL imports and calls
it only when this process trusts that exact string (`trusted_factories` in the connection's config,
the shell's `--model`, `factory=` at capture, or `DEFAULT_TRUSTED`); otherwise the model comes from
`con.attach_model(model)`, or the query fails with a message that says how to trust it. Even a
trusted factory resolves only to an nn.Module class or a plain function, and its kwargs are plain
JSON data, never a route to another callable.
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
import types
from pathlib import Path
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from metaql.errors import BinderException, InvalidInputException, IOException
from metaql.storage.tensorfile import fsync_path

# Rebuilders of models a store describes as data: an nn.Sequential of torch.nn built-ins (their
# classes and constructor arguments), and a Hugging Face model (its transformers class and config).
# They build only torch.nn / transformers classes, so they are trusted like MetaQL's own models.
SEQUENTIAL = "metaql.storage.models:sequential"
HUGGINGFACE = "metaql.storage.models:huggingface"

# MetaQL's own models, trusted without asking so `metaql demo` then `metaql STORE -c ...` works.
# Exact strings only: a prefix ("metaql.*") would trust "metaql.demo:shutil.rmtree" style paths.
DEFAULT_TRUSTED = frozenset({"metaql.demo:DigitsMLP", SEQUENTIAL, HUGGINGFACE})

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_FACTORY = re.compile(rf"^{_NAME}(\.{_NAME})*:{_NAME}(\.{_NAME})*$")
_MAX_KWARGS_CHARS = 1 << 20


class UntrustedFactoryError(BinderException):
    """The store names model code that this process has not trusted."""


def save_weights(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(tmp))
    fsync_path(tmp)             # the catalog records the file's checksum: it must be on disk first
    tmp.replace(path)
    fsync_path(path.parent)


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    _require(path)
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError, OSError or others on a damaged file
        raise _unreadable(path, e) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BinderException(f"the model does not fit the weights in {path.name} ({_first_line(e)}); "
                              "attach a model of the architecture the store was captured with "
                              "(con.attach_model(model))") from None
    return model


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header; no tensor data is read."""
    _require(path)
    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise _unreadable(path, e) from None


def factory_of(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def check_factory_name(factory: object) -> str:
    """The factory string if it is a well-formed 'package.module:callable' without dunder parts."""
    if not isinstance(factory, str) or not _FACTORY.match(factory) or \
            any(p.startswith("__") for p in re.split(r"[.:]", factory)):
        raise BinderException(
            f"'{_show(factory)}' is not a model factory: write 'package.module:callable' "
            "(identifiers only, no __dunder__ parts), e.g. 'mypkg.models:Net'")
    return factory


def trusted_factories(value: object) -> set[str]:
    """The `trusted_factories` config value as a set of checked factory strings."""
    if value is None:
        return set()
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise InvalidInputException("config['trusted_factories'] must be a list of 'package.module:callable' "
                                    f"strings, got {_show(value)}")
    return {check_factory_name(f) for f in value}


def parse_kwargs(kwargs_json: object) -> dict:
    """The catalog's model kwargs as a dict of plain JSON data; junk means the store was tampered with."""
    if kwargs_json is None:
        return {}
    try:
        if not isinstance(kwargs_json, str) or len(kwargs_json) > _MAX_KWARGS_CHARS:
            raise ValueError("not a JSON text of at most 1 MiB")
        kwargs = json.loads(kwargs_json, parse_constant=_refuse_constant)
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
            raise ValueError("not a JSON object whose keys are identifiers")
    except (ValueError, RecursionError) as e:
        raise IOException(f"the catalog's model kwargs are not valid JSON keyword arguments ({_first_line(e)}; "
                          f"got {_show(kwargs_json)}): the store was tampered with or damaged") from None
    return kwargs


def build_model(factory: str, kwargs_json: str | None, weights: Path | None = None) -> nn.Module:
    """Calls a factory the caller has decided to trust; resolution is safe even so. With `weights`,
    the model must fit that file before it is built for real (see _check_fits)."""
    kwargs = parse_kwargs(kwargs_json)
    target = _resolve(check_factory_name(factory))
    if weights is not None:
        _check_fits(factory, target, kwargs, weight_shapes(weights))
    try:
        model = target(**kwargs)
    except Exception as e:  # the factory's own error, with its arguments
        raise BinderException(f"cannot rebuild the model: {factory}(**{_show(kwargs)}) raised "
                              f"{type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise BinderException(f"cannot rebuild the model: factory '{factory}' returned a "
                              f"{type(model).__name__}, not a torch.nn.Module")
    return model


def _check_fits(factory: str, target, kwargs: dict, shapes: dict) -> None:
    """Kwargs from a received catalog can ask even a trusted factory for a model of any size
    ({"hidden": 10**9}); a build on the meta device allocates nothing, so only a model whose
    parameters match the weights file is built for real."""
    try:
        with torch.device("meta"):
            mine = {k: tuple(v.shape) for k, v in target(**kwargs).state_dict().items()}
    except Exception:  # a factory that cannot build on the meta device: the real build and load check it
        return
    if mine != shapes:
        diff = sorted(set(mine.items()) ^ set(shapes.items()))[:2]
        raise BinderException(f"{factory}(**{_show(kwargs)}) builds a model that does not fit the checkpoint's "
                              f"weights (e.g. {_show(diff)}): the store's model kwargs were changed since "
                              "capture; attach the right model with con.attach_model(model)")


def untrusted(factory: object, kwargs_json: object) -> UntrustedFactoryError:
    """The error for a recorded factory this process has not trusted: what it is, how to trust it."""
    what = (f"this store's model is built by '{_show(factory)}' with kwargs {_show(kwargs_json)}, code "
            "that this process has not trusted (MetaQL never runs code a store names unless you say so)")
    try:
        name = check_factory_name(factory)
    except BinderException:
        where = (" (the class was defined in a script, which no other process can import: move it into a module, "
                 "e.g. mymodels.py, and capture with that class, then the shell takes `metaql STORE --model "
                 "mymodels:ClassName`)" if str(factory).startswith("__main__:") or "<locals>" in str(factory) else "")
        return UntrustedFactoryError(f"{what}; it is not a factory MetaQL can call{where}: in Python, pass an "
                                     "instance of the architecture to con.attach_model(model) (the weights still "
                                     "come from the store)")
    return UntrustedFactoryError(
        f"{what}. If you trust it: metaql.connect(path, config={{'trusted_factories': ['{name}']}}), or "
        f"in the shell `metaql STORE --model {name}`; or pass an instance of the architecture to "
        "con.attach_model(model) (the weights still come from the store)")


def factory_is_rebuildable(model: nn.Module, factory: str, kwargs: dict) -> bool:
    """True when the recorded factory builds a model with the same parameter names and shapes."""
    try:
        if ":" not in factory or "<locals>" in factory or factory.startswith("__main__:"):
            return False
        # a throwaway build must not draw from the user's RNG (dropout masks, data order)
        with torch.random.fork_rng(devices=[]):
            other = build_model(factory, json.dumps(kwargs))
    except Exception:  # any failure means "not rebuildable"; the caller warns
        return False
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return mine == {k: tuple(v.shape) for k, v in other.state_dict().items()}


def recipe(model: nn.Module, factory: str | None, kwargs: dict | None) -> tuple[str, dict]:
    """(factory, kwargs) to record for `model`: the user's, else a rebuild from data for an
    nn.Sequential of torch.nn built-ins or a Hugging Face model, else the model's class."""
    if factory is None and kwargs is None:
        data = sequential_recipe(model) or huggingface_recipe(model)
        if data is not None:
            return data
    return factory or factory_of(model), kwargs if kwargs is not None else init_kwargs(model)


def sequential_recipe(model: nn.Module) -> tuple[str, dict] | None:
    """(SEQUENTIAL, kwargs) for an nn.Sequential whose modules are torch.nn built-ins with
    constructor arguments read back from their attributes; None when a rebuild would differ."""
    if type(model) is not nn.Sequential:
        return None
    spec = _module_spec(model)
    if spec is None:
        return None
    kwargs = {"layers": spec["layers"]}
    try:
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            rebuilt = sequential(**json.loads(json.dumps(kwargs)))
    except Exception:  # an argument read back wrongly: not rebuildable
        return None
    same = repr(rebuilt) == repr(model) and \
        {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return (SEQUENTIAL, kwargs) if same else None


def _module_spec(module: nn.Module) -> dict | None:
    cls = type(module)
    if getattr(nn, cls.__name__, None) is not cls:
        return None           # not a torch.nn built-in: its constructor is not known
    if cls is nn.Sequential:
        layers = [[name, _module_spec(child)] for name, child in module.named_children()]
        return None if any(spec is None for _, spec in layers) else {"class": "Sequential", "layers": layers}
    if any(True for _ in module.children()) and not isinstance(module, nn.MultiheadAttention):
        return None           # a built-in container of other modules (ModuleList, Transformer...)
    args = {}
    for p in _init_parameters(cls):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype", "mode") or p.name.startswith("_"):
            continue
        if not hasattr(module, p.name):
            continue          # left to its default; the repr comparison catches a wrong one
        value = getattr(module, p.name)
        if p.name == "bias" and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None
        value = list(value) if isinstance(value, tuple) else value
        if not _plain_json(value):
            return None
        args[p.name] = value
    return {"class": cls.__name__, "kwargs": args}


def _init_parameters(cls: type) -> list:
    """The constructor's named parameters; a class that forwards *args, **kwargs (nn.LSTM) has its
    parent's (RNNBase's, whose `mode` the class fills in itself)."""
    for c in cls.__mro__:
        params = list(inspect.signature(c.__init__).parameters.values())[1:]
        if any(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            return params
    return []


def _plain_json(value) -> bool:
    if isinstance(value, list):
        return all(_plain_json(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def sequential(layers: list) -> nn.Sequential:
    """Builds the nn.Sequential a store records as data: torch.nn classes and their arguments only."""
    from collections import OrderedDict
    return nn.Sequential(OrderedDict((str(name), _build_spec(spec)) for name, spec in layers))


def _build_spec(spec: dict) -> nn.Module:
    if not isinstance(spec, dict) or not isinstance(spec.get("class"), str):
        raise BinderException(f"the store's model layers are not a torch.nn spec: {_show(spec)}")
    cls = getattr(nn, spec["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith("torch.nn.")):
        raise BinderException(f"'{_show(spec['class'])}' is not a torch.nn module class; MetaQL rebuilds "
                              "nn.Sequential models of torch.nn built-ins only")
    if cls is nn.Sequential:
        return sequential(spec.get("layers", []))
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise BinderException(f"the store's arguments of {cls.__name__} are not a JSON object")
    return cls(**kwargs)


def huggingface_recipe(model: nn.Module) -> tuple[str, dict] | None:
    """(HUGGINGFACE, {cls, config}) for a model of a class transformers exports, else None."""
    import sys
    transformers = sys.modules.get("transformers")
    # read from the class's own bases first: transformers.PreTrainedModel is a lazy attribute whose
    # first access imports transformers' modeling code (6.4 s here), which a plain torch model's
    # capture has no use for when some other code merely imported transformers
    if transformers is None or not any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
                                       for c in type(model).__mro__):
        return None
    if not isinstance(model, transformers.PreTrainedModel):
        return None
    cls = type(model)
    if getattr(transformers, cls.__name__, None) is not cls:
        return None           # a user's subclass (or remote code): not rebuildable from the config alone
    return HUGGINGFACE, {"cls": cls.__name__, "config": json.loads(model.config.to_json_string())}


def huggingface(cls: str, config: dict) -> nn.Module:
    """Builds a transformers model class (one transformers exports, never remote code) from the
    config saved with the weights."""
    try:
        import transformers
    except ImportError:
        raise BinderException("this store's model is a Hugging Face model: install transformers to "
                              "replay it") from None
    target = getattr(transformers, cls, None) if isinstance(cls, str) and cls.isidentifier() else None
    if not (isinstance(target, type) and issubclass(target, transformers.PreTrainedModel)):
        raise BinderException(f"'{_show(cls)}' is not a model class of transformers; MetaQL rebuilds "
                              "Hugging Face models of the library's own classes only")
    if not isinstance(config, dict):
        raise BinderException("the store's Hugging Face config is not a JSON object")
    return target(target.config_class.from_dict(config))


def init_kwargs(model: nn.Module) -> dict:
    """Constructor kwargs a model advertises in a `metaql_config` dict attribute, else none."""
    cfg = getattr(model, "metaql_config", None)
    return dict(cfg) if isinstance(cfg, dict) else {}


def import_kind(path: str) -> None:
    """Imports the module of a trusted layer-kind path ('package.module:Class'); importing it
    registers the kind. The name must resolve to a LayerKind subclass."""
    from metaql.storage.layers import LayerKind
    try:
        obj = _imported(check_factory_name(path))
    except (ImportError, AttributeError) as e:
        raise BinderException(f"cannot load the layer kind '{path}' ({e}); install the package that defines "
                              "it") from None
    if not (isinstance(obj, type) and issubclass(obj, LayerKind)):
        raise BinderException(f"'{path}' is a {type(obj).__name__}, not a metaql LayerKind class")


def _imported(path: str):
    """What 'package.module:Name.Inner' names, reached through modules and classes only (a getattr
    on anything else could run a property)."""
    module_name, _, attr = path.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        if not isinstance(obj, (types.ModuleType, type)):
            raise AttributeError(f"'{part}' is reached through a {type(obj).__name__}")
        obj = getattr(obj, part)
    return obj


def _resolve(factory: str):
    """The nn.Module class or plain function a factory names. The walk goes through modules and
    classes only (a getattr on anything else could run a property), and ends at nothing callable
    but those two (never a builtin like eval or os.system, a bound method or a partial)."""
    try:
        obj = _imported(factory)
    except (ImportError, AttributeError) as e:
        raise BinderException(
            f"cannot rebuild the model: factory '{factory}' is not importable ({e}); "
            "install the package that defines it, or pass the model to con.attach_model(model)"
        ) from None
    if (isinstance(obj, type) and issubclass(obj, nn.Module)) or isinstance(obj, types.FunctionType):
        return obj
    raise BinderException(f"factory '{factory}' is a {type(obj).__name__}, not an nn.Module class or a plain "
                          "function: MetaQL will not call it; pass the model to con.attach_model(model)")


def _require(path: Path) -> None:
    if not path.exists():
        raise IOException(f"weights file {path} is missing; the checkpoint cannot be replayed")


def _unreadable(path: Path, e: Exception) -> IOException:
    return IOException(f"weights file {path} is corrupt or unreadable ({type(e).__name__}: {_first_line(e)}); "
                       "the checkpoint cannot be replayed: restore the store from a backup")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _show(value: object) -> str:
    """A short printable form of a value that may come from a hostile catalog."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:200])
    return text if len(value if isinstance(value, str) else text) <= 200 else text + "...(truncated)"
