"""Weight initialisers named in configs: `"name"` or `"name:argument"`.

    normal:0.01          N(0, 0.01^2), the textbook's choice for its RNNs
    xavier_uniform       Glorot & Bengio 2010 (also: xavier_normal, glorot_uniform, glorot_normal)
    lecun_normal         variance 1/fan_in (Flax's default for Dense)
    orthogonal[:gain]    a (scaled) orthogonal matrix, for recurrent weights
    constant:0.5         every entry the same: the textbook's symmetry experiment
    zeros, ones
"""

import flax.linen as nn

_NO_ARGUMENT = {
    "xavier_uniform": nn.initializers.xavier_uniform,
    "xavier_normal": nn.initializers.xavier_normal,
    "glorot_uniform": nn.initializers.glorot_uniform,
    "glorot_normal": nn.initializers.glorot_normal,
    "lecun_normal": nn.initializers.lecun_normal,
    "zeros": lambda: nn.initializers.zeros_init(),
    "ones": lambda: nn.initializers.ones_init(),
}
_WITH_ARGUMENT = {  # name -> (initialiser from a float, its default or None if required)
    "normal": (lambda std: nn.initializers.normal(stddev=std), None),
    "orthogonal": (lambda gain: nn.initializers.orthogonal(scale=gain), 1.0),
    "constant": (nn.initializers.constant, None),
}
NAMES = tuple(sorted(_NO_ARGUMENT)) + tuple(sorted(_WITH_ARGUMENT))


def from_spec(spec: str):
    """The Flax initialiser of `spec` ('normal:0.01', 'orthogonal', ...); ValueError if unknown."""
    if not isinstance(spec, str):
        raise TypeError(f"initialiser {spec!r}: expected a string such as 'normal:0.01'")
    name, _, argument = spec.partition(":")
    if name in _NO_ARGUMENT and not argument:
        return _NO_ARGUMENT[name]()
    if name in _WITH_ARGUMENT:
        make, default = _WITH_ARGUMENT[name]
        if not argument and default is None:
            raise ValueError(f"initialiser {spec!r}: {name} needs a value, e.g. '{name}:0.01'")
        try:
            value = float(argument) if argument else default
        except ValueError:
            raise ValueError(f"initialiser {spec!r}: {argument!r} is not a number") from None
        return make(value)
    raise ValueError(f"unknown initialiser {spec!r}; expected one of {NAMES} "
                     "(normal, orthogonal and constant take ':value')")
