"""Helpers for ml-collections configs: experiment arguments, validation, saving beside checkpoints."""

import json
import math
import os
from typing import Any

import ml_collections


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


def expect(ok: bool, key: str, value: Any, what: str):
    """Raises a ValueError naming the config key when a value is out of its valid range."""
    if not ok:
        raise ValueError(f"config.{key}={value!r}: {what}")


def expect_type(config, key: str, types):
    value = config
    for part in key.split("."):
        value = value[part]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        names = "/".join(t.__name__ for t in _tuple(types))
        raise TypeError(f"config.{key}={value!r} has type {type(value).__name__}; expected {names}")
    return value


def _tuple(types):
    return types if isinstance(types, tuple) else (types,)


def expect_positive_int(config, *keys):
    for key in keys:
        value = expect_type(config, key, int)
        expect(value > 0, key, value, "must be a positive integer")


def expect_fraction(config, key: str, low_open=False):
    value = expect_type(config, key, (int, float))
    ok = math.isfinite(value) and (0 < value if low_open else 0 <= value) and value < 1
    expect(ok, key, value, f"must be in {'(' if low_open else '['}0, 1)")


# The published BERT shapes (Turc et al. 2019, "Well-Read Students Learn Better"):
# layers, d_model, heads; the FFN is 4 * d_model wide.
BERT_SIZES = {"tiny": (2, 128, 2), "mini": (4, 256, 4), "small": (4, 512, 8),
              "medium": (8, 512, 8), "base": (12, 768, 12)}


def bert_model_config(size: str) -> dict:
    """The `model` section of a BERT experiment of one of `BERT_SIZES`."""
    if size not in BERT_SIZES:
        raise ValueError(f"size={size!r}: expected one of {sorted(BERT_SIZES)}")
    num_layers, d_model, num_heads = BERT_SIZES[size]
    return dict(size=size, num_layers=num_layers, d_model=d_model, num_heads=num_heads,
                ffn_hiddens=4 * d_model, max_position=512, norm="post", attention="full",
                block_size=64, look_back=1, dropout=0.1, attention_dropout=0.1, dtype="float32")


CONFIG_FILE = "config.json"


def save(config: ml_collections.ConfigDict, workdir: str):
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def load(workdir: str) -> ml_collections.ConfigDict | None:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


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
