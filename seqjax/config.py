"""Helpers for ml-collections configs: experiment files and their arguments, dotted overrides,
checks that name the key, and the copy saved beside checkpoints (read back under today's keys)."""

import importlib.util
import json
import math
import os
from typing import Any

import ml_collections

from seqjax import files


def load_experiment(path: str):
    """The module of an experiment file (`experiments/X.py`, without a `:arg` suffix)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no experiment file {path!r}")
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"seqjax_experiment_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses the `:a=1,b=x,flag` suffix of `--config experiments/X.py:...` (as big_vision does).

    A bare word sets a boolean flag; values are converted to the type of their default, and an
    unknown name is an error that lists the known ones.
    """
    args = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in defaults:
            raise ValueError(f"unknown config argument {name!r}; known: {sorted(defaults)}")
        default = defaults[name]
        if not value:
            value = True
        elif isinstance(default, bool):
            value = value.lower() in ("1", "true", "yes")
        elif default is not None:
            value = type(default)(value)
        args[name] = value
    return args


def override(config: ml_collections.ConfigDict, overrides: dict, what: str = "override"):
    """A copy of `config` with `overrides` ({'a.b': value}) set; a key the config lacks or a
    value of the wrong type is an error that names `what` and the key."""
    copy = config.copy_and_resolve_references()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        target = copy
        for parent in parents:
            target = target.get(parent) if hasattr(target, "get") else None
        if not hasattr(target, "get") or leaf not in target:
            raise ValueError(f"{what}: the config has no field {key!r}")
        try:
            setattr(target, leaf, value)
        except TypeError as e:
            raise TypeError(f"{what}: {key}={value!r}: {e}") from None
    return copy


def get(config, key: str):
    """config['a']['b'] for key 'a.b'."""
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def expect(ok: bool, key: str, value: Any, what: str):
    """Raises a ValueError naming the config key when a value is out of its valid range."""
    if not ok:
        raise ValueError(f"config.{key}={value!r}: {what}")


def expect_type(config, key: str, types):
    value = get(config, key)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        names = "/".join(t.__name__ for t in _tuple(types))
        raise TypeError(f"config.{key}={value!r} has type {type(value).__name__}; expected {names}")
    return value


def _tuple(types):
    return types if isinstance(types, tuple) else (types,)


def expect_run_dir(config, key: str):
    """Checks that config value `key` names an existing directory (another run's workdir), on
    this machine or in a bucket."""
    path = expect_type(config, key, str)
    if not files.exists(path):
        raise FileNotFoundError(f"config.{key}={path!r}: no such directory")
    expect(files.is_dir(path), key, path, "is a file, not the workdir of a run")


def expect_positive_int(config, *keys):
    for key in keys:
        value = expect_type(config, key, int)
        expect(value > 0, key, value, "must be a positive integer")


def expect_fraction(config, key: str, low_open=False):
    value = expect_type(config, key, (int, float))
    ok = math.isfinite(value) and (0 < value if low_open else 0 <= value) and value < 1
    expect(ok, key, value, f"must be in {'(' if low_open else '['}0, 1)")


CONFIG_FILE = "config.json"


def save(config: ml_collections.ConfigDict, workdir: str):
    files.write_text(os.path.join(workdir, CONFIG_FILE),
                     config.to_json_best_effort(indent=2, sort_keys=True))


# Keys renamed since runs were saved (old -> new): a saved config is read under the new names.
RENAMED = {"model.num_hiddens": "model.hidden", "model.embed_size": "model.embed_dim"}


def load(workdir: str) -> ml_collections.ConfigDict | None:
    """The config saved in `workdir`, or None; keys of `RENAMED` read under their new names,
    and a block-local model saved before `model.look_ahead` existed as the 0 it computed (a key
    a saved config lacks otherwise reads as the experiment's current default)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not files.exists(path):
        return None
    saved = json.loads(files.read_text(path))
    for old, new in RENAMED.items():
        (*parents, old_leaf), new_leaf = old.split("."), new.split(".")[-1]
        section = saved
        for parent in parents:
            section = section.get(parent) if isinstance(section, dict) else None
        if isinstance(section, dict) and old_leaf in section and new_leaf not in section:
            section[new_leaf] = section.pop(old_leaf)
    model = saved.get("model")
    if isinstance(model, dict) and model.get("attention") == "local":
        model.setdefault("look_ahead", 0)
    return ml_collections.ConfigDict(saved)


def with_defaults(saved: ml_collections.ConfigDict, defaults) -> ml_collections.ConfigDict:
    """`saved` (a run's config.json) completed with the fields it lacks from `defaults` (the
    experiment's current config): a run saved before a field was added reads as if it had the
    field's default."""
    if defaults is None:
        return saved
    merged = ml_collections.ConfigDict(defaults.to_dict())

    def merge(target, source):
        for key, value in source.items():
            if isinstance(value, ml_collections.ConfigDict) and \
                    isinstance(target.get(key), ml_collections.ConfigDict):
                merge(target[key], value)
            else:
                with target.ignore_type():
                    target[key] = value

    merge(merged, saved)
    return merged


def differences(saved: dict, now: dict) -> list[str]:
    """'key: a (saved) != b (now)' for each key of two flat dicts whose values differ. A key
    that only `now` has is a field added since the run was saved, and counts as its default."""
    return [f"{k}: {saved.get(k)!r} (saved) != {now.get(k)!r} (now)"
            for k in sorted(saved) if saved.get(k) != now.get(k)]


def flatten(d, prefix="") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}, for dicts and ConfigDicts."""
    if isinstance(d, ml_collections.ConfigDict):
        d = d.to_dict()
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out
