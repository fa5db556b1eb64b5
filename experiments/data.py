"""Generated data sets (nothing is downloaded).

- NNDL digit sum (see `BOOK`), faithful to the book's generator: every one of the 100 pairs
  of leading digits, label = their sum (19 classes), the rest zeros except one
  random position in [2, L) holding a random digit; k copies per pair; all
  lengths 5..35 step 5 generated in order (train k=3, dev k=1, test k=1) from
  one ``np.random.seed(0)`` stream, exactly as the book's script does.
- The adding problem (Hochreiter & Schmidhuber 1997; Pascanu et al. 2013).
- The temporal-order problem (Hochreiter & Schmidhuber 1997, experiment 6a).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# The source of the digit-sum task and of the experiments' default setup.
BOOK = (
    "Qiu Xipeng et al., *Neural Networks and Deep Learning: Cases and Practice* "
    "(《神经网络与深度学习：案例与实践》, the NNDL practice book), chapter 6 (recurrent "
    "networks): the SRN memory experiment on the digit-sum task and the "
    "gradient-explosion experiment that follows it. We follow a PyTorch port of its "
    "Paddle code."
)

NNDL_LENGTHS = (5, 10, 15, 20, 25, 30, 35)
NNDL_SPLITS = (("train", 3), ("dev", 1), ("test", 1))


@dataclasses.dataclass(frozen=True)
class Split:
  """Inputs and targets of one split. Tokens are int32; adding-problem inputs float32."""

  x: np.ndarray
  y: np.ndarray

  def __len__(self) -> int:
    return len(self.y)


def nndl_generate(length: int, k: int, rng: np.random.RandomState) -> Split:
  """The book's ``generate_data(length, k)``, drawing from `rng` in the same order."""
  if length < 3:
    raise ValueError(f"length must be > 2, got {length}.")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}.")
  seqs, labels = [], []
  for n1 in range(10):
    for n2 in range(10):
      for _ in range(k):
        idx = rng.randint(2, length)
        val = rng.randint(0, 10)
        seq = [n1, n2] + [0] * (length - 2)
        seq[idx] = val
        seqs.append(seq)
        labels.append(n1 + n2)
  return Split(np.asarray(seqs, np.int32), np.asarray(labels, np.int32))


def nndl_digit_sum(length: int, seed: int = 0) -> dict[str, Split]:
  """Train/dev/test of the given length, as the book's script writes them.

  The script seeds NumPy once and generates all lengths in order, so the data
  of length 20 depends on the draws made for lengths 5..15 first; we replay
  them.
  """
  if length not in NNDL_LENGTHS:
    raise ValueError(f"length must be one of {NNDL_LENGTHS}, got {length}.")
  rng = np.random.RandomState(seed)
  for n in NNDL_LENGTHS:
    splits = {name: nndl_generate(n, k, rng) for name, k in NNDL_SPLITS}
    if n == length:
      return splits
  raise AssertionError("unreachable")


def adding_problem(n: int, length: int, rng: np.random.Generator) -> Split:
  """Inputs (n, length, 2): a value in U(0,1) and a 0/1 marker; target: sum of the 2 marked values.

  One marker falls in the first half, the other in the second half, so the
  dependency spans about length/2 steps. A model that predicts 1 always has
  MSE about 1/6.
  """
  if length < 2:
    raise ValueError(f"length must be >= 2, got {length}.")
  values = rng.uniform(0, 1, size=(n, length)).astype(np.float32)
  half = length // 2
  first = rng.integers(0, half, size=n)
  second = rng.integers(half, length, size=n)
  markers = np.zeros((n, length), np.float32)
  markers[np.arange(n), first] = 1
  markers[np.arange(n), second] = 1
  x = np.stack([values, markers], axis=-1)
  y = (values * markers).sum(axis=1).astype(np.float32)
  return Split(x, y)


# Temporal order: symbols a, b, c, d are distractors; X, Y the relevant ones;
# B and E mark the start and end. Classes: XX, XY, YX, YY.
TEMPORAL_VOCAB = ("a", "b", "c", "d", "X", "Y", "B", "E")


def temporal_order(n: int, length: int, rng: np.random.Generator) -> Split:
  """Token sequences (n, length) whose class is the order of the two relevant symbols.

  The relevant symbols sit at positions drawn from [0.1, 0.2) and [0.5, 0.6)
  of the length (10-20 and 50-60 for length 100, as in the original).
  """
  if length < 10:
    raise ValueError(f"length must be >= 10, got {length}.")
  x = rng.integers(0, 4, size=(n, length)).astype(np.int32)
  x[:, 0], x[:, -1] = 6, 7
  lo1, hi1 = max(1, int(0.1 * length)), max(2, int(0.2 * length))
  lo2, hi2 = int(0.5 * length), max(int(0.5 * length) + 1, int(0.6 * length))
  t1 = rng.integers(lo1, hi1, size=n)
  t2 = rng.integers(lo2, hi2, size=n)
  s1 = rng.integers(0, 2, size=n)
  s2 = rng.integers(0, 2, size=n)
  x[np.arange(n), t1] = 4 + s1
  x[np.arange(n), t2] = 4 + s2
  return Split(x, (2 * s1 + s2).astype(np.int32))


def make_dataset(
    task: str, length: int, *, seed: int = 0, n_train: int = 0, n_eval: int = 0
) -> dict[str, Split]:
  """The splits of `task` ('digit_sum', 'adding' or 'temporal_order')."""
  if task == "digit_sum":
    return nndl_digit_sum(length, seed)
  gen = {"adding": adding_problem, "temporal_order": temporal_order}.get(task)
  if gen is None:
    raise ValueError(f"task must be 'digit_sum', 'adding' or 'temporal_order', got {task!r}.")
  if n_train < 1 or n_eval < 1:
    raise ValueError(f"{task} needs n_train >= 1 and n_eval >= 1.")
  rng = np.random.default_rng(seed)
  return {
      "train": gen(n_train, length, rng),
      "dev": gen(n_eval, length, rng),
      "test": gen(n_eval, length, rng),
  }


def batches(split: Split, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Fixed-order minibatches (no shuffle, as the book's DataLoader), padded to batch_size.

  Returns xs (num_batches, batch_size, ...), ys and a float32 mask that is 0 on
  padding, so a final short batch (300 = 4*64 + 44) keeps its true size.
  """
  n = len(split)
  nb = -(-n // batch_size)
  pad = nb * batch_size - n
  x = np.concatenate([split.x, np.zeros((pad, *split.x.shape[1:]), split.x.dtype)])
  y = np.concatenate([split.y, np.zeros((pad,), split.y.dtype)])
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  shape = (nb, batch_size)
  return x.reshape(*shape, *split.x.shape[1:]), y.reshape(shape), mask.reshape(shape)
