"""Recurrent classifiers in Flax, BPTT through ``jax.lax.scan``.

The cells are written out so that the parameters carry the book's names
(NNDL, see ``experiments.data.BOOK``; SRN: ``W``, ``U``, ``b``) and so that
every cell accepts an additive perturbation of its hidden state at each step:
the gradient of the loss with respect to that (zero) perturbation is dL/dh_t,
the quantity whose vanishing or explosion over time the diagnostics plot.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def torch_linear_init(fan_in: int) -> Callable:
  """PyTorch nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weight and bias."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class SRN(nn.Module):
  """h_t = tanh(x_t W + h_{t-1} U + b), W: (in, hidden), U: (hidden, hidden), b: (1, hidden)."""

  hidden_size: int
  # (Not called `init`: a field of that name would shadow nn.Module.init.)
  weight_init: str = "zeros"  # the book's PyTorch port: zeros; 'xavier': Paddle's Xavier variant

  @nn.compact
  def __call__(self, xs: Array, perturb: Array | None = None) -> tuple[Array, Array]:
    """xs: (batch, time, in). Returns (last hidden state, all hidden states (time, batch, h))."""
    h = self.hidden_size
    d = xs.shape[-1]
    if self.weight_init == "zeros":
      w_init = u_init = b_init = nn.initializers.zeros
    elif self.weight_init == "xavier":
      w_init = u_init = b_init = nn.initializers.xavier_uniform()
    else:
      raise ValueError(f"weight_init must be 'zeros' or 'xavier', got {self.weight_init!r}.")
    W = self.param("W", w_init, (d, h))
    U = self.param("U", u_init, (h, h))
    b = self.param("b", b_init, (1, h))
    # The input projection of all steps is one matmul outside the loop.
    return _scan(lambda hs, zx: jnp.tanh(zx + hs @ U), xs @ W + b, h, perturb)


class LSTM(nn.Module):
  """LSTM with fused gates (input, forget, cell, output); forget-gate bias 1."""

  hidden_size: int

  @nn.compact
  def __call__(self, xs: Array, perturb: Array | None = None) -> tuple[Array, Array]:
    h = self.hidden_size
    d = xs.shape[-1]
    W = self.param("W", nn.initializers.xavier_uniform(), (d, 4 * h))
    U = self.param("U", nn.initializers.orthogonal(), (h, 4 * h))
    b = self.param("b", lambda k, s: jnp.zeros(s).at[h : 2 * h].set(1.0), (4 * h,))

    def step(carry, zx):
      hs, cs = carry[:, :h], carry[:, h:]
      z = zx + hs @ U
      i, f, g, o = jnp.split(z, 4, axis=-1)
      cs = jax.nn.sigmoid(f) * cs + jax.nn.sigmoid(i) * jnp.tanh(g)
      hs = jax.nn.sigmoid(o) * jnp.tanh(cs)
      return jnp.concatenate([hs, cs], axis=-1)

    last, states = _scan(step, xs @ W + b, 2 * h, perturb, perturb_slice=h)
    return last[:, :h], states[..., :h]


class GRU(nn.Module):
  """GRU (reset gate applied after the recurrent matmul, as cuDNN / PyTorch)."""

  hidden_size: int

  @nn.compact
  def __call__(self, xs: Array, perturb: Array | None = None) -> tuple[Array, Array]:
    h = self.hidden_size
    d = xs.shape[-1]
    W = self.param("W", nn.initializers.xavier_uniform(), (d, 3 * h))
    U = self.param("U", nn.initializers.orthogonal(), (h, 3 * h))
    b = self.param("b", nn.initializers.zeros, (3 * h,))
    bu = self.param("b_hn", nn.initializers.zeros, (h,))

    def step(hs, zx):
      zh = hs @ U
      r = jax.nn.sigmoid(zx[:, :h] + zh[:, :h])
      u = jax.nn.sigmoid(zx[:, h : 2 * h] + zh[:, h : 2 * h])
      n = jnp.tanh(zx[:, 2 * h :] + r * (zh[:, 2 * h :] + bu))
      return (1 - u) * n + u * hs

    return _scan(step, xs @ W + b, h, perturb)


def _scan(cell, zs, state_size, perturb, perturb_slice=None):
  """Runs `cell(h, z_t)` over time on input projections zs (batch, time, .).

  Adds perturb[t] to the (first perturb_slice of the) state after each step.
  Short sequences are unrolled: on CPU a loop iteration costs more than the
  step's tiny matmuls.
  """
  batch, time = zs.shape[0], zs.shape[1]
  h0 = jnp.zeros((batch, state_size), zs.dtype)
  if perturb is None:
    perturb = jnp.zeros((time, batch, perturb_slice or state_size), zs.dtype)
  width = perturb.shape[-1]

  def body(hs, inputs):
    z, e = inputs
    hs = cell(hs, z)
    hs = hs.at[:, :width].add(e)
    return hs, hs

  last, states = jax.lax.scan(
      body, h0, (jnp.swapaxes(zs, 0, 1), perturb), unroll=min(time, MAX_UNROLL)
  )
  return last, states


MAX_UNROLL = 20

CELLS = {"srn": SRN, "lstm": LSTM, "gru": GRU}


class SequenceClassifier(nn.Module):
  """Embedding (or a linear input map for real-valued inputs) -> RNN -> linear head on h_T.

  For ``num_classes == 1`` it is a regressor (the adding problem).
  """

  cell: str = "srn"
  vocab_size: int = 10  # 0 for real-valued inputs
  embed_size: int = 32
  hidden_size: int = 32
  num_classes: int = 19
  srn_init: str = "zeros"
  # The seed's PyTorch code keeps the embedding as a plain tensor: never trained,
  # and outside clip_grad_norm_. Frozen here, its gradient is zero, so it does
  # not move and adds nothing to a clipper's norm. (The Paddle book trains it.)
  freeze_embedding: bool = False

  @nn.compact
  def __call__(self, x: Array, perturb: Array | None = None) -> Array:
    if self.vocab_size:
      # The book's Embedding: a Xavier-uniform (vocab, embed) table, indexed.
      table = self.param(
          "embedding", nn.initializers.xavier_uniform(), (self.vocab_size, self.embed_size)
      )
      if self.freeze_embedding:
        table = jax.lax.stop_gradient(table)
      emb = table[x]
    else:
      emb = nn.Dense(self.embed_size, name="input")(x)
    if self.cell not in CELLS:
      raise ValueError(f"cell must be one of {sorted(CELLS)}, got {self.cell!r}.")
    kwargs = {"weight_init": self.srn_init} if self.cell == "srn" else {}
    last, _ = CELLS[self.cell](self.hidden_size, name="rnn", **kwargs)(emb, perturb)
    head_init = torch_linear_init(self.hidden_size)
    return nn.Dense(self.num_classes, kernel_init=head_init, bias_init=head_init, name="linear")(
        last
    )

  def perturbation_shape(self, x: Array) -> tuple[int, int, int]:
    return (x.shape[1], x.shape[0], self.hidden_size)
