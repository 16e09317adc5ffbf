"""The training sample stream: fixed-length token windows drawn from a weighted blend of datasets.

Sample i is a pure function of (seed, i), so the stream resumes from a sample
counter alone and does not depend on batch sizes or the number of ranks.
"""

import functools
import math
import numbers

import numpy as np
import torch

from megamix.data.indexed import IndexedDataset
from megamix.errors import CheckpointError, ConfigError, DataError

# Weights are rounded to multiples of 1/WEIGHT_RESOLUTION so that the dataset
# choice is exact integer arithmetic and repeats with a period of at most this
# many samples (0.7 / 0.3 repeats every 10 samples).
WEIGHT_RESOLUTION = 100_000


class TokenWindows:
    """Overlapping windows over the packed tokens of one dataset.

    Window j is ``tokens[j * seq_len : j * seq_len + seq_len + 1]``: a model input of
    ``seq_len`` tokens and, shifted by one, its targets. Documents are packed back
    to back, each already ending in EOS.
    """

    def __init__(self, dataset: IndexedDataset, seq_len: int):
        if seq_len < 1:
            raise ConfigError(f"seq_len must be a positive number of tokens, got {seq_len}")
        self.num_windows = (dataset.num_tokens - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(
                f"{dataset.bin_path} has {dataset.num_tokens} tokens, fewer than the seq_len + 1 = {seq_len + 1} "
                "of one training sample; use a smaller seq_len or more text"
            )
        tokens = dataset.tokens
        self.view = np.lib.stride_tricks.as_strided(
            tokens,
            shape=(self.num_windows, seq_len + 1),
            strides=(seq_len * tokens.itemsize, tokens.itemsize),
            writeable=False,
        )

    def __len__(self) -> int:
        return self.num_windows

    def windows(self, indices: np.ndarray) -> np.ndarray:
        """Windows ``indices [k]`` as ``[k, seq_len + 1]`` token ids, in the dataset's dtype."""
        return self.view[indices]


class BlendSchedule:
    """Which dataset each sample comes from, and how many earlier samples that dataset gave.

    With integer shares a_d summing to P, sample i goes to the dataset d that
    maximises ``a_d * (i + 1) - P * drawn_d(i)`` (ties: lowest d), where
    ``drawn_d(i)`` counts the samples before i taken from d. Every prefix then
    holds ``a_d / P`` of its samples from dataset d to within one sample (with
    more than five datasets, slightly more), and the choices repeat every P
    samples, so only one period is stored.
    """

    def __init__(self, shares: list[int]):
        self.shares = np.asarray(shares, dtype=np.int64)
        self.period = int(self.shares.sum())
        credit = [0] * len(shares)
        drawn = [0] * len(shares)
        choices, ranks = [], []
        for _ in range(self.period):
            for d, share in enumerate(shares):
                credit[d] += share
            best = max(range(len(shares)), key=credit.__getitem__)
            credit[best] -= self.period
            choices.append(best)
            ranks.append(drawn[best])
            drawn[best] += 1
        self.choices = np.asarray(choices, dtype=np.int64)
        self.ranks = np.asarray(ranks, dtype=np.int64)

    def lookup(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For sample indices ``[k]``: (dataset of each ``[k]``, draws from that dataset before it ``[k]``)."""
        periods, positions = np.divmod(samples, self.period)
        datasets = self.choices[positions]
        return datasets, periods * self.shares[datasets] + self.ranks[positions]


def integer_shares(weights: list[float], names: list[str]) -> list[int]:
    """Round positive weights to integer shares of WEIGHT_RESOLUTION, reduced by their gcd."""
    for weight, name in zip(weights, names):
        if not (isinstance(weight, numbers.Real) and math.isfinite(weight) and weight > 0):
            raise DataError(f"blend weight of {name} is {weight!r}; weights must be positive finite numbers")
    total = sum(weights)
    exact = [weight / total * WEIGHT_RESOLUTION for weight in weights]
    shares = [math.floor(x) for x in exact]
    # Largest remainders get the seats that flooring left over.
    by_remainder = sorted(range(len(exact)), key=lambda d: shares[d] - exact[d])
    for d in by_remainder[: WEIGHT_RESOLUTION - sum(shares)]:
        shares[d] += 1
    for share, weight, name in zip(shares, weights, names):
        if share == 0:
            raise DataError(
                f"blend weight {weight!r} of {name} is below 1/{WEIGHT_RESOLUTION} of the total; "
                "raise it or drop the dataset"
            )
    divisor = math.gcd(*shares)
    return [share // divisor for share in shares]


class BlendedSamples:
    """An infinite, deterministic sequence of ``[seq_len + 1]`` samples from weighted datasets.

    The k-th window drawn from dataset d is ``perm[k % n]``, where n is the number
    of windows of d and perm the permutation of epoch ``k // n`` seeded by
    (seed, d, epoch): every epoch visits each window once.
    """

    def __init__(self, datasets: list[tuple[IndexedDataset, float]], seq_len: int, seed: int):
        if not datasets:
            raise DataError("no datasets to sample from; give at least one (prefix, weight) pair")
        if not is_count(seed):
            raise ConfigError(f"the sampling seed must be a non-negative integer, got {seed!r}")
        self.seq_len = seq_len
        self.seed = int(seed)
        self.windows = [TokenWindows(dataset, seq_len) for dataset, _ in datasets]
        self.schedule = BlendSchedule(
            integer_shares([weight for _, weight in datasets], [dataset.bin_path for dataset, _ in datasets])
        )
        # The current and the next epoch of every dataset stay cached across an epoch boundary.
        self.permutation = functools.lru_cache(maxsize=2 * len(datasets))(self.make_permutation)

    def make_permutation(self, dataset: int, epoch: int) -> np.ndarray:
        """The order in which ``epoch`` visits the windows of ``dataset``, ``[num_windows]``."""
        generator = np.random.Generator(np.random.PCG64([self.seed, dataset, epoch]))
        return generator.permutation(len(self.windows[dataset]))

    def window_indices(self, dataset: int, draws: np.ndarray) -> np.ndarray:
        """Window index of the ``draws [k]``-th samples taken from ``dataset``, ``[k]``."""
        epochs, positions = np.divmod(draws, len(self.windows[dataset]))
        indices = np.empty_like(draws)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            indices[in_epoch] = self.permutation(dataset, int(epoch))[positions[in_epoch]]
        return indices

    def get(self, start: int, count: int) -> torch.Tensor:
        """Samples ``start .. start + count - 1`` as a LongTensor ``[count, seq_len + 1]``."""
        datasets, draws = self.schedule.lookup(np.arange(start, start + count, dtype=np.int64))
        samples = np.empty((count, self.seq_len + 1), dtype=np.int64)
        for dataset in np.unique(datasets):
            rows = np.flatnonzero(datasets == dataset)
            samples[rows] = self.windows[dataset].windows(self.window_indices(int(dataset), draws[rows]))
        return torch.from_numpy(samples)


class SampleStream:
    """Consumes ``BlendedSamples`` in order; its state is the number of samples consumed."""

    def __init__(self, samples: BlendedSamples):
        self.samples = samples
        self.consumed = 0

    def next_batch(self, count: int) -> torch.Tensor:
        """The next ``count`` samples, LongTensor ``[count, seq_len + 1]``."""
        batch = self.samples.get(self.consumed, count)
        self.consumed += count
        return batch

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        consumed = state.get("consumed") if isinstance(state, dict) else None
        if not is_count(consumed):
            raise CheckpointError(
                f"data position {state!r} is not {{'consumed': <non-negative int>}}; "
                "the checkpoint's data state is damaged"
            )
        self.consumed = int(consumed)


def is_count(value) -> bool:
    """True for a non-negative integer (numpy integers included, bools not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0
