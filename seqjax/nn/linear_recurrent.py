"""Linear recurrent layers, which train in parallel over time: the hidden state is kept out of
every nonlinearity, so the recurrence is h_t = a_t * h_{t-1} + b_t (elementwise), and all T
states come from one parallel prefix scan (`jax.lax.associative_scan`, O(log T) depth) instead
of T sequential steps.

- `MinGRU`, `MinLSTM` (Feng et al. 2024, "Were RNNs All We Needed?"): the GRU's and LSTM's gates
  read only the input x_t, not h_{t-1}. `log_space=True` is the paper's log-space form (the
  candidate through g(x) = x + 1/2 for x >= 0, sigmoid(x) below, so it is positive, and the
  scan as a cumulative log-sum-exp); the plain form needs no such care here, because the
  associative scan multiplies and adds and never divides by a running product.
- `LRU` (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for Long Sequences"): a
  complex diagonal recurrence x_t = lambda * x_{t-1} + gamma * (B u_t), y_t = Re(C x_t) + D * u_t,
  with lambda = exp(-exp(nu) + i exp(theta)), so |lambda| < 1 for any parameter value; the
  moduli start uniform on the ring [r_min, r_max], and gamma = sqrt(1 - |lambda|^2) keeps the
  state's scale.
- `LinearRecurrentStack`: the papers' residual blocks, x + Dropout(GLU(layer(LayerNorm(x)))),
  after a linear projection of the inputs, optionally bidirectional.

Every layer takes `seq_lengths` (padded outputs exactly zero, the final state at each
sequence's own last step) and a state: calling it on one token with the state of the previous
call decodes at O(1) per token. Carries are real arrays (the LRU's complex state as [real,
imag] halves) so that they checkpoint like any other.

Dimension letters: B batch, T time, F input features, H features, N the LRU's state size.
"""

import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from seqjax.nn import compute
from seqjax.nn.recurrent import check_inputs

Dtype = Any
Initializer = Callable[..., jax.Array]
SCAN_METHODS = ("associative", "sequential")


# ----------------------------------------------------------------------------- scans

def linear_scan(a, b, h0=None, *, method: str = "associative", reverse: bool = False):
    """h_t = a_t * h_{t-1} + b_t along the time axis of [*batch, time, features] arrays (real or
    complex; `a` broadcasts to `b`), with h_{-1} = h0 (zeros by default); returns h of b's
    shape. `reverse` runs from the last step to the first, h0 entering at the last.
    `method='sequential'` is the reference: a `lax.scan` of T steps."""
    if method not in SCAN_METHODS:
        raise ValueError(f"method={method!r}: expected one of {SCAN_METHODS}")
    a = jnp.broadcast_to(a, b.shape)
    if h0 is not None:
        first = -1 if reverse else 0
        b = b.at[..., first, :].add(a[..., first, :] * h0)
    if method == "sequential":
        def step(h, ab):
            h = ab[0] * h + ab[1]
            return h, h
        a_T, b_T = jnp.moveaxis(a, -2, 0), jnp.moveaxis(b, -2, 0)
        _, h_T = lax.scan(step, jnp.zeros_like(b_T[0]), (a_T, b_T), reverse=reverse)
        return jnp.moveaxis(h_T, 0, -2)

    def combine(earlier, later):  # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
        a1, b1 = earlier
        a2, b2 = later
        return a1 * a2, a2 * b1 + b2

    # reverse=True scans the flipped arrays: `earlier` is then the later time step.
    return lax.associative_scan(combine, (a, b), axis=b.ndim - 2, reverse=reverse)[1]


def log_linear_scan(log_a, log_b, h0=None, *, reverse: bool = False):
    """`linear_scan` of positive a = exp(log_a) and b = exp(log_b) in log space (Heinsen 2023,
    the form minGRU and minLSTM use): h_t = exp(A_t + logcumsumexp_s<=t(log_b_s - A_s)) with
    A_t = sum_s<=t log_a_s. `h0` must be >= 0; returns h."""
    log_a = jnp.broadcast_to(log_a, log_b.shape)
    if reverse:
        flip = lambda x: jnp.flip(x, -2)
        return flip(log_linear_scan(flip(log_a), flip(log_b), h0))
    if h0 is not None:
        log_b = log_b.at[..., 0, :].set(jnp.logaddexp(log_b[..., 0, :],
                                                      log_a[..., 0, :] + jnp.log(h0)))
    a_star = jnp.cumsum(log_a, axis=-2)
    return jnp.exp(a_star + lax.cumlogsumexp(log_b - a_star, axis=log_b.ndim - 2))


def _valid_mask(seq_lengths, shape):
    """[*batch, T, 1] bool, True at steps t < length; None without lengths."""
    if seq_lengths is None:
        return None
    T = shape[-2]
    return (jnp.arange(T) < jnp.asarray(seq_lengths)[..., None])[..., None]


def _log_g(x):
    """log of g(x) = x + 1/2 (x >= 0), sigmoid(x) (x < 0): minGRU's positive candidate."""
    return jnp.where(x >= 0, jnp.log(jax.nn.relu(x) + 0.5), -jax.nn.softplus(-x))


# ----------------------------------------------------------------------------- layers

class _Linear(nn.Module):
    """What the layers share: a recurrence from (a, b) coefficients of the inputs, with
    padding (a = 1, b = 0 leave the state as it was) and an optional reversed direction."""

    features: int
    method: str = "associative"
    reverse: bool = False
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        del rng
        return jnp.zeros(tuple(input_shape[:-1]) + (self.features,), self.param_dtype)

    def _dense(self, x, features, name):
        check_features(self, name, x.shape[-1])
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=self.kernel_init, bias_init=self.bias_init, name=name)(x)

    def _scan(self, a, b, h0, valid, log_space=False):
        """(final state, states) of the recurrence; padded steps keep the state."""
        if valid is not None:  # log space: a finite "log 0", so that no gradient is NaN
            a = jnp.where(valid, a, 0.0 if log_space else 1.0)
            b = jnp.where(valid, b, -1e30 if log_space else 0.0)
        if log_space and self.method == "associative":
            h = log_linear_scan(a, b, h0, reverse=self.reverse)
        else:  # the sequential reference of the log-space form runs on exp(a), exp(b)
            a, b = (jnp.exp(a), jnp.exp(b)) if log_space else (a, b)
            h = linear_scan(a, b, h0, method=self.method, reverse=self.reverse)
        return h[..., 0 if self.reverse else -1, :], h


def check_features(module, name: str, features: int):
    """A clear error for inputs whose feature size differs from the one `module`'s Dense
    `name` was made for (Flax's own is a shape mismatch deep inside init)."""
    if module.has_variable("params", name):
        expected = module.get_variable("params", name)["kernel"].shape[0]
        if expected != features:
            raise ValueError(f"{type(module).__name__} at '{module.scope.path_text}': inputs have "
                             f"{features} features; its parameters were made for {expected}")


class MinGRU(_Linear):
    """minGRU: z_t = sigmoid(W_z x_t + b_z), h~_t = W_h x_t + b_h (through g in log space),
    h_t = (1 - z_t) * h_{t-1} + z_t * h~_t. `__call__(x, h0, seq_lengths=...)` returns
    (final state [*batch, H], states [*batch, T, H])."""

    log_space: bool = False

    @nn.compact
    def __call__(self, x_BxTxF, h0=None, *, seq_lengths=None):
        check_inputs(x_BxTxF, seq_lengths)
        k_BxTxH, h_BxTxH = jnp.split(self._dense(x_BxTxF, 2 * self.features, "W_x"), 2, -1)
        k, h_tilde = k_BxTxH.astype(jnp.float32), h_BxTxH.astype(jnp.float32)
        valid = _valid_mask(seq_lengths, x_BxTxF.shape)
        if self.log_space:
            a, b = -jax.nn.softplus(k), -jax.nn.softplus(-k) + _log_g(h_tilde)
        else:
            z = jax.nn.sigmoid(k)
            a, b = 1.0 - z, z * h_tilde
        last, h = self._scan(a, b, h0, valid, self.log_space)
        return last, _zero_padding(h, valid).astype(self.dtype or jnp.float32)


class MinLSTM(_Linear):
    """minLSTM: f_t = sigmoid(W_f x_t), i_t = sigmoid(W_i x_t), normalised to
    f'_t = f_t / (f_t + i_t) and i'_t = i_t / (f_t + i_t), h~_t = W_h x_t (through g in log
    space), h_t = f'_t * h_{t-1} + i'_t * h~_t. Returns (final state, states) as `MinGRU`."""

    log_space: bool = False

    @nn.compact
    def __call__(self, x_BxTxF, h0=None, *, seq_lengths=None):
        check_inputs(x_BxTxF, seq_lengths)
        k_f, k_i, h_tilde = jnp.split(self._dense(x_BxTxF, 3 * self.features, "W_x")
                                      .astype(jnp.float32), 3, -1)
        valid = _valid_mask(seq_lengths, x_BxTxF.shape)
        if self.log_space:
            diff = jax.nn.softplus(-k_f) - jax.nn.softplus(-k_i)
            a, b = -jax.nn.softplus(diff), -jax.nn.softplus(-diff) + _log_g(h_tilde)
        else:
            f, i = jax.nn.sigmoid(k_f), jax.nn.sigmoid(k_i)
            a, b = f / (f + i), i / (f + i) * h_tilde
        last, h = self._scan(a, b, h0, valid, self.log_space)
        return last, _zero_padding(h, valid).astype(self.dtype or jnp.float32)


def _zero_padding(x, valid):
    return x if valid is None else jnp.where(valid, x, 0.0)


def lru_ring_init(r_min: float, r_max: float):
    """nu_log initialiser: |lambda| = exp(-exp(nu_log)) uniform in area on the ring
    [r_min, r_max] (the LRU paper's Lemma 3.2)."""
    def init(rng, shape, dtype=jnp.float32):
        u = jax.random.uniform(rng, shape, dtype)
        return jnp.log(-0.5 * jnp.log(u * (r_max ** 2 - r_min ** 2) + r_min ** 2))
    return init


class LRU(_Linear):
    """The Linear Recurrent Unit: inputs u [*batch, T, F] -> y [*batch, T, H] through a complex
    diagonal state of size N (`state_dim`, default H). Parameters: `nu_log`, `theta_log` [N]
    (lambda), `gamma_log` [N], `B_re`, `B_im` [F, N], `C_re`, `C_im` [N, H], `D` [F] (used when
    F == H; the skip connection of the paper's layer). The carry is [*batch, 2N]: the state's
    real and imaginary parts."""

    state_dim: Optional[int] = None
    r_min: float = 0.0
    r_max: float = 1.0
    max_phase: float = 2 * math.pi

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        del rng
        return jnp.zeros(tuple(input_shape[:-1]) + (2 * (self.state_dim or self.features),),
                         jnp.float32)

    @nn.compact
    def __call__(self, u_BxTxF, carry=None, *, seq_lengths=None):
        check_inputs(u_BxTxF, seq_lengths)
        F, N, H = u_BxTxF.shape[-1], self.state_dim or self.features, self.features
        if self.has_variable("params", "B_re"):
            made_for = self.get_variable("params", "B_re").shape[0]
            if made_for != F:
                raise ValueError(f"LRU at '{self.scope.path_text}': inputs have {F} features; its "
                                 f"parameters were made for {made_for}")
        if not 0 <= self.r_min < self.r_max <= 1:
            raise ValueError(f"r_min={self.r_min}, r_max={self.r_max}: need 0 <= r_min < "
                             f"r_max <= 1")
        nu_log = self.param("nu_log", lru_ring_init(self.r_min, self.r_max), (N,))
        theta_log = self.param("theta_log", lambda rng, shape: jnp.log(
            self.max_phase * jax.random.uniform(rng, shape)), (N,))
        lam_abs = jnp.exp(-jnp.exp(nu_log))
        gamma_log = self.param("gamma_log", lambda _, shape: jnp.log(
            jnp.sqrt(1 - lam_abs ** 2)), (N,))
        glorot = lambda fan_in: nn.initializers.normal(1.0 / math.sqrt(2 * fan_in))
        B = self.param("B_re", glorot(F), (F, N)) + 1j * self.param("B_im", glorot(F), (F, N))
        C = self.param("C_re", glorot(N), (N, H)) + 1j * self.param("C_im", glorot(N), (N, H))
        D = self.param("D", nn.initializers.normal(1.0), (F,))
        lam = lru_lambda(nu_log, theta_log)
        bu_BxTxN = (u_BxTxF.astype(jnp.float32) @ B) * jnp.exp(gamma_log)
        h0 = None if carry is None else carry[..., :N] + 1j * carry[..., N:]
        valid = _valid_mask(seq_lengths, u_BxTxF.shape)
        last, x_BxTxN = self._scan(lam, bu_BxTxN, h0, valid)
        y = (x_BxTxN @ C).real
        if F == H:
            y = y + D * u_BxTxF.astype(jnp.float32)
        y = _zero_padding(y, valid).astype(self.dtype or jnp.float32)
        return jnp.concatenate([last.real, last.imag], -1), y


def lru_lambda(nu_log, theta_log):
    """The LRU's eigenvalues lambda = exp(-exp(nu_log) + i exp(theta_log)): the diagonal of its
    recurrence, |lambda| < 1 for any parameter value."""
    return jnp.exp(-jnp.exp(nu_log) + 1j * jnp.exp(theta_log))


LINEAR_CELLS = {"mingru": MinGRU, "minlstm": MinLSTM, "lru": LRU}


class LinearRecurrentStack(nn.Module):
    """`num_layers` residual blocks x + Dropout(GLU(layer(LayerNorm(x)))) over a Dense
    projection of the inputs to `features`, and a final LayerNorm: the layout of the LRU and
    minGRU papers. With `bidirectional`, each block's layer is a forward and a reversed one
    whose outputs are concatenated before the GLU. Parameters: `input`, `block_{i}` (or
    `block_{i}_fwd`, `block_{i}_bwd`), `block_{i}_norm`, `block_{i}_glu`, `norm`. The carry is
    a tuple with one state per block (a (forward, backward) pair when bidirectional); outputs
    at padded steps are exactly zero. `layer_options` go to every layer (log_space, r_min, ...);
    `remat` rematerialises each layer (`seqjax.nn.compute`)."""

    cell_type: str
    features: int
    num_layers: int = 1
    dropout_rate: float = 0.0
    bidirectional: bool = False
    method: str = "associative"
    layer_options: tuple = ()
    remat: str = "none"
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.nowrap
    def _layer(self, **kwargs):
        if self.cell_type not in LINEAR_CELLS:
            raise ValueError(f"unknown cell_type {self.cell_type!r}; expected one of "
                             f"{sorted(LINEAR_CELLS)}")
        return compute.remat(LINEAR_CELLS[self.cell_type], self.remat)(
            self.features, method=self.method, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.kernel_init, bias_init=self.bias_init,
            **dict(self.layer_options), **kwargs)

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        one = self._layer(parent=None).initialize_carry(rng, input_shape)
        return tuple((one, one) if self.bidirectional else one for _ in range(self.num_layers))

    @nn.compact
    def __call__(self, inputs_BxTxF, initial_carry=None, *, seq_lengths=None,
                 deterministic: bool = True):
        """Returns (carries, outputs [*batch, T, H])."""
        check_inputs(inputs_BxTxF, seq_lengths)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = functools.partial(nn.Dense, kernel_init=self.kernel_init,
                                  bias_init=self.bias_init, **kw)
        check_features(self, "input", inputs_BxTxF.shape[-1])
        x = dense(self.features, name="input")(inputs_BxTxF)
        carries = []
        for i in range(self.num_layers):
            carry = None if initial_carry is None else initial_carry[i]
            y = nn.LayerNorm(name=f"block_{i}_norm", **kw)(x)
            if self.bidirectional:
                fwd, bwd = (None, None) if carry is None else carry
                fwd, y_fwd = self._layer(name=f"block_{i}_fwd")(y, fwd, seq_lengths=seq_lengths)
                bwd, y_bwd = self._layer(name=f"block_{i}_bwd", reverse=True)(
                    y, bwd, seq_lengths=seq_lengths)
                carry, y = (fwd, bwd), jnp.concatenate([y_fwd, y_bwd], -1)
            else:
                carry, y = self._layer(name=f"block_{i}")(y, carry, seq_lengths=seq_lengths)
            value, gate = jnp.split(dense(2 * self.features, name=f"block_{i}_glu")(y), 2, -1)
            y = nn.Dropout(self.dropout_rate)(value * jax.nn.sigmoid(gate),
                                              deterministic=deterministic)
            x = x + y
            carries.append(carry)
        x = nn.LayerNorm(name="norm", **kw)(x)
        return tuple(carries), _zero_padding(x, _valid_mask(seq_lengths, inputs_BxTxF.shape))
