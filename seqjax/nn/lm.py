"""Language models: next-token prediction over a token stream.

Dimension letters: B batch, T time, V vocabulary, E embedding, H hidden.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn import compute
from seqjax.nn.linear_recurrent import LINEAR_CELLS, LinearRecurrentStack
from seqjax.nn.recurrent import StackedRecurrent

Initializer = Callable[..., jax.Array]


class RecurrentLM(nn.Module):
    """Tokens -> (one-hot or embedding) -> stacked recurrent layers -> logits over the vocabulary.

    The hidden state is an explicit input and output, so a caller can carry it across
    consecutive minibatches of a stream (the textbook's sequential partitioning) or
    generate one token at a time. `logits_from_inputs` starts from the input vectors, so
    one can differentiate with respect to them.
    """

    vocab_size: int
    cell: str = "lstm"
    hidden: int = 256
    num_layers: int = 1
    embed_dim: int = 0  # 0: one-hot input, as in the textbook
    dropout_rate: float = 0.0
    unroll: int = 1
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    recurrent_init: Initializer = nn.initializers.orthogonal()
    bias_init: Initializer = nn.initializers.zeros_init()
    forget_bias: float = 0.0
    head_init: Initializer = nn.initializers.lecun_normal()
    # linear recurrences (mingru, minlstm, lru): their scan, and options of the layers
    scan_method: str = "associative"
    layer_options: tuple = ()
    remat: str = "none"  # each recurrent layer's, see seqjax.nn.compute

    @nn.nowrap
    def _rnn(self, **kwargs) -> StackedRecurrent | LinearRecurrentStack:
        if self.cell in LINEAR_CELLS:
            return LinearRecurrentStack(
                self.cell, self.hidden, num_layers=self.num_layers,
                dropout_rate=self.dropout_rate, method=self.scan_method,
                layer_options=self.layer_options, remat=self.remat, dtype=self.dtype,
                param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                bias_init=self.bias_init, **kwargs)
        return StackedRecurrent(self.cell, self.hidden, num_layers=self.num_layers,
                                dropout_rate=self.dropout_rate, unroll=self.unroll,
                                remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype,
                                kernel_init=self.kernel_init, recurrent_init=self.recurrent_init,
                                bias_init=self.bias_init, forget_bias=self.forget_bias, **kwargs)

    def setup(self):
        if self.embed_dim:
            self.embed = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        self.rnn = self._rnn()
        self.drop = nn.Dropout(self.dropout_rate)
        self.head = nn.Dense(self.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype,
                             kernel_init=self.head_init, bias_init=self.bias_init,
                             dot_general=compute.float32_dot)

    def __call__(self, tokens_BxT, carry=None, *, deterministic: bool = True):
        """Returns (logits_BxTxV in float32, carry after the last step)."""
        if self.embed_dim:
            x_BxTxE = self.drop(self.embed(tokens_BxT), deterministic=deterministic)
        else:
            x_BxTxE = jax.nn.one_hot(tokens_BxT, self.vocab_size, dtype=self.dtype or jnp.float32)
        return self.logits_from_inputs(x_BxTxE, carry, deterministic=deterministic)

    def logits_from_inputs(self, x_BxTxE, carry=None, *, deterministic: bool = True):
        """The model after its input layer: (logits_BxTxV in float32, carry)."""
        carry, h_BxTxH = self.rnn(x_BxTxE, carry, deterministic=deterministic)
        logits_BxTxV = self.head(self.drop(h_BxTxH, deterministic=deterministic))
        return logits_BxTxV.astype(jnp.float32), carry

    @nn.nowrap
    def initialize_carry(self, batch_size: int):
        input_dim = self.embed_dim or self.vocab_size
        return self._rnn(parent=None).initialize_carry(jax.random.PRNGKey(0),
                                                       (batch_size, input_dim))
