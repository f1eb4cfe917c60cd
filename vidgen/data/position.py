"""Exact data position: which clips training has consumed, independent of how many workers consumed them.

Slots: sample i of the listing (its index in `ClipStream.samples`) offers clips k = 0..K-1 (K = data.clips_per_video),
slot i*K + k. A sample may make fewer clips than K (a short video) or none (a bad sample): those slots are empty.

Order: epoch e visits the samples in `epoch_order(S, seed, e)`, a seeded permutation that depends on nothing else
(not on the number of workers, not on timing). Position q of that order goes to rank q % world, and each rank
reads its share in order, clip by clip (`rank_rows`).

Position: `DataPosition` holds the epoch floor (every epoch below it is consumed) and, per open epoch, a bitmap
of the slots that were trained or found empty. A checkpoint stores it merged over all ranks; a resume, with
any number of workers, deals out only the slots not yet consumed, in the same order. With the same number of
workers a resumed rank sees exactly the clips it would have seen; with another number every clip of every
epoch is still trained exactly once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import numpy as np

from vidgen.errors import DataError

if TYPE_CHECKING:
    import ray.data


class Shares(Protocol):
    """A training input that each rank reads its own share of: the clips of data.source (`ClipStream`), or a
    latent cache (`vidgen.train.latents.CacheStream`, whose "samples" are its shards)."""

    source: str
    seed: int
    num_samples: int
    clips_per_sample: int

    def share_dataset(self, epoch: int, samples: np.ndarray, wanted: np.ndarray) -> ray.data.Dataset:
        """Rows of `samples` (in that order) whose clips are `wanted` (bool [n, K]), each with `_slot`, `_order`
        (the position in `samples`) and `_made` (how many clips its sample makes)."""
        ...


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """int64 [num_samples]: the sample indices in epoch `epoch`'s visiting order, a function of (seed, epoch)."""
    rng = np.random.default_rng([seed % (1 << 64), epoch % (1 << 64), 0x5A3B])
    return rng.permutation(num_samples).astype(np.int64)


class DataPosition:
    """Consumed slots of a training run (see the module docstring). Not thread-safe; one per rank."""

    def __init__(self, num_samples: int, clips_per_sample: int, floor: int = 0,
                 done: dict[int, np.ndarray] | None = None):
        if num_samples < 1 or clips_per_sample < 1:
            raise ValueError(f"need >= 1 sample and clip per sample, got {num_samples} x {clips_per_sample}")
        self.num_samples, self.clips_per_sample, self.floor = num_samples, clips_per_sample, floor
        self._done: dict[int, np.ndarray] = dict(done or {})  # epoch -> bool [num_samples * clips_per_sample]

    @property
    def num_slots(self) -> int:
        return self.num_samples * self.clips_per_sample

    def done(self, epoch: int) -> np.ndarray:
        """bool [num_slots]: the slots of `epoch` consumed so far (all of them below the floor)."""
        if epoch < self.floor:
            return np.ones(self.num_slots, dtype=bool)
        if epoch not in self._done:
            self._done[epoch] = np.zeros(self.num_slots, dtype=bool)
        return self._done[epoch]

    def set_done(self, epoch: int, done: np.ndarray) -> None:
        """Replace an open epoch's bitmap (with the bitmap merged over all ranks)."""
        if epoch >= self.floor:
            self._done[epoch] = np.asarray(done, dtype=bool)

    def open_epochs(self) -> list[int]:
        return sorted(e for e in self._done if e >= self.floor)

    def mark(self, epochs, slots) -> None:
        """Slots trained: int arrays [n] of each one's epoch and slot."""
        epochs, slots = np.asarray(epochs, dtype=np.int64), np.asarray(slots, dtype=np.int64)
        for epoch in np.unique(epochs).tolist():
            if epoch >= self.floor:
                self.done(epoch)[slots[epochs == epoch]] = True

    def mark_samples(self, epoch: int, samples, first_clip: int = 0) -> None:
        """Every slot from clip `first_clip` on of `samples` (indices) of `epoch`: clips those samples do not make."""
        k = self.clips_per_sample
        if epoch < self.floor or first_clip >= k:
            return
        rows = self.done(epoch).reshape(self.num_samples, k)
        rows[np.asarray(samples, dtype=np.int64), first_clip:] = True

    def share(self, epoch: int, rank: int, world: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(samples int64 [n], wanted bool [n, K]): this rank's samples of `epoch` that still have a slot to
        consume, in visiting order, and which of their clips are still wanted."""
        order = epoch_order(self.num_samples, seed, epoch)[rank::world]
        wanted = ~self.done(epoch).reshape(self.num_samples, self.clips_per_sample)[order]
        keep = wanted.any(axis=1)
        return order[keep], wanted[keep]

    def advance(self) -> None:
        """Move the floor past every fully consumed epoch; forget their bitmaps."""
        while self.floor in self._done and self._done[self.floor].all():
            del self._done[self.floor]
            self.floor += 1
        for e in [e for e in self._done if e < self.floor]:
            del self._done[e]

    def state(self) -> dict:
        """What a checkpoint stores: a few bytes per 8 slots of each open epoch."""
        self.advance()
        return {"version": 1, "samples": self.num_samples, "clips_per_sample": self.clips_per_sample,
                "floor": self.floor, "done": {e: np.packbits(self._done[e]).tobytes() for e in self.open_epochs()}}

    @classmethod
    def from_state(cls, state: dict, num_samples: int, clips_per_sample: int) -> DataPosition:
        """The position a checkpoint stored; DataError when it was made over another listing of the data."""
        if (state.get("samples"), state.get("clips_per_sample")) != (num_samples, clips_per_sample):
            raise DataError(
                f"the checkpoint's data position covers {state.get('samples')} samples x "
                f"{state.get('clips_per_sample')} clips, but data.source now lists {num_samples} samples x "
                f"{clips_per_sample} clips (data.clips_per_video): resume over the same data, or start a new run.name")
        n = num_samples * clips_per_sample
        done = {int(e): np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=n).astype(bool)
                for e, bits in state["done"].items()}
        return cls(num_samples, clips_per_sample, int(state["floor"]), done)


def rank_rows(shares: Shares, position: DataPosition, rank: int, world: int,
              skipped: Counter | None = None) -> Iterator[dict]:
    """This rank's rows, epoch after epoch without end, from where `position` says training stands.

    Each row carries `_epoch` and `_slot`: mark them in `position` once the row is trained. Empty slots (bad
    samples, clips a short video does not make) are marked here, as they are found. DataError when two epochs
    in a row give this rank nothing: its samples are all unusable. skipped: counts, per epoch, the samples found
    to make no clip (bad samples) among those whose first clip was still wanted (a sample whose first clip was
    trained before a resume is never counted); within an epoch the ranks' counts add up without overlap.
    """
    epoch, barren = position.floor, 0
    while True:
        samples, wanted = position.share(epoch, rank, world, shares.seed)
        got, last = 0, -1
        if len(samples):
            for row in shares.share_dataset(epoch, samples, wanted).iter_rows():
                row = dict(row)
                order = int(row.pop("_order"))
                if order < last:
                    raise RuntimeError(f"rank {rank}: epoch {epoch} rows came out of order ({order} after {last})")
                _none_made(position, epoch, samples[last + 1:order], wanted[last + 1:order], skipped)
                position.mark_samples(epoch, samples[order:order + 1], first_clip=int(row.pop("_made")))
                last = order
                got += 1
                yield {**row, "_epoch": epoch}
            _none_made(position, epoch, samples[last + 1:], wanted[last + 1:], skipped)
        barren = 0 if got or not len(samples) else barren + 1
        if barren == 2:
            raise DataError(f"rank {rank} of {world}: no usable clip among its {len(samples)} samples of epochs "
                            f"{epoch - 1} and {epoch} of {shares.source}")
        epoch += 1


def _none_made(position: DataPosition, epoch: int, samples, wanted, skipped: Counter | None) -> None:
    """`samples` made no clip at all: their slots are empty; those whose first clip was wanted are counted."""
    position.mark_samples(epoch, samples)
    if skipped is not None:
        skipped[epoch] += int(wanted[:, 0].sum())
