"""Character-level recurrent language models on tiny Shakespeare.

Embedding -> one recurrent layer (LSTM, GRU or tanh RNN) -> linear read-out, trained on the mean
next-character cross-entropy over random windows of the corpus. The corpus (uint8 character ids,
on the device) is a leaf of the task.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from selfopt.tasks.base import SPLITS, Task, static_field, task_dataclass
from selfopt.tasks.classifiers import check_positive_int
from selfopt.tasks.datasets import load_text


def rnn_step(pre_activations: jax.Array, state, recurrent: jax.Array):
    """Elman RNN: ``h = tanh(W x + U h + b)``."""
    h, c = state
    h = jnp.tanh(pre_activations + h @ recurrent)
    return h, c


def gru_step(pre_activations: jax.Array, state, recurrent: jax.Array):
    """GRU (Cho et al., 2014) with the reset gate applied after the recurrent product."""
    h, c = state
    x_r, x_z, x_n = jnp.split(pre_activations, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(h @ recurrent, 3, axis=-1)
    reset, update = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
    candidate = jnp.tanh(x_n + reset * h_n)
    return (1.0 - update) * candidate + update * h, c


def lstm_step(pre_activations: jax.Array, state, recurrent: jax.Array):
    """LSTM (Hochreiter & Schmidhuber, 1997) without peepholes."""
    h, c = state
    i, f, g, o = jnp.split(pre_activations + h @ recurrent, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


#: cell name -> (step function, number of gate blocks in the weight matrices). The state is
#: ``(h, c)`` for every cell; ``c`` is the LSTM's memory and passes unchanged through the others.
CELLS = {"rnn": (rnn_step, 1), "gru": (gru_step, 3), "lstm": (lstm_step, 4)}


@functools.cache
def device_text() -> tuple[jax.Array, jax.Array, int]:
    """The corpus's train and test ids on the device, and the vocabulary size."""
    text = load_text()
    return jnp.asarray(text.train_ids), jnp.asarray(text.test_ids), len(text.vocab)


@task_dataclass
class LanguageModel(Task):
    """A one-layer recurrent character model; batches are random windows of the corpus."""

    train_ids: jax.Array  # (n_train,) uint8
    test_ids: jax.Array  # (n_test,) uint8
    vocab_size: int = static_field()
    cell: str = static_field()
    embed_dim: int = static_field()
    hidden: int = static_field()
    seq_len: int = static_field()
    batch_size: int = static_field()

    family = "language_model"
    loss_floor = 0.0

    @classmethod
    def create(cls, cell: str = "lstm", embed_dim: int = 32, hidden: int = 64,
               seq_len: int = 32, batch_size: int = 32) -> LanguageModel:
        """Builds the task.

        Args:
          cell: ``"lstm"``, ``"gru"`` or ``"rnn"``.
          embed_dim: size of the character embedding.
          hidden: size of the recurrent state.
          seq_len: characters predicted per window.
          batch_size: windows per batch.

        Returns:
          The task.
        """
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
        train_ids, test_ids, vocab_size = device_text()
        return cls(train_ids=train_ids, test_ids=test_ids, vocab_size=vocab_size, cell=cell,
                   embed_dim=check_positive_int("embed_dim", embed_dim),
                   hidden=check_positive_int("hidden", hidden),
                   seq_len=check_positive_int("seq_len", seq_len),
                   batch_size=check_positive_int("batch_size", batch_size))

    def init(self, key: jax.Array) -> dict[str, jax.Array]:
        """Normal embedding, LeCun-normal input and read-out weights, orthogonal recurrent
        weights; the LSTM's forget-gate bias starts at 1 (Jozefowicz et al., 2015)."""
        embed_key, input_key, recurrent_key, output_key = jax.random.split(key, 4)
        gates = CELLS[self.cell][1] * self.hidden
        bias = jnp.zeros(gates)
        if self.cell == "lstm":
            bias = bias.at[self.hidden:2 * self.hidden].set(1.0)
        lecun = jax.nn.initializers.lecun_normal()
        return {
            "embed": jax.random.normal(embed_key, (self.vocab_size, self.embed_dim)),
            "input": lecun(input_key, (self.embed_dim, gates)),
            "recurrent": jax.nn.initializers.orthogonal()(recurrent_key, (self.hidden, gates)),
            "bias": bias,
            "output": lecun(output_key, (self.hidden, self.vocab_size)),
            "output_bias": jnp.zeros(self.vocab_size),
        }

    def sample_batch(self, key: jax.Array, split: str = "train") -> jax.Array:
        """``batch_size`` random windows of ``seq_len + 1`` characters, int32."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        ids = self.train_ids if split == "train" else self.test_ids
        starts = jax.random.randint(key, (self.batch_size, 1), 0, ids.shape[0] - self.seq_len)
        return ids[starts + jnp.arange(self.seq_len + 1)].astype(jnp.int32)

    def loss(self, params: dict[str, jax.Array], batch: jax.Array) -> jax.Array:
        """Mean cross-entropy of each next character given the ones before it in its window."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        # Input projections of all steps at once, time-major for the scan.
        pre_activations = params["embed"][inputs.T] @ params["input"] + params["bias"]
        step, _ = CELLS[self.cell]

        def scan_step(state, x):
            state = step(x, state, params["recurrent"])
            return state, state[0]

        zeros = jnp.zeros((self.batch_size, self.hidden))
        _, hidden_states = jax.lax.scan(scan_step, (zeros, zeros), pre_activations)
        logits = hidden_states @ params["output"] + params["output_bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets.T).mean()
