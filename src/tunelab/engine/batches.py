"""Batches for the loop: the training loader that resumes mid-epoch and keeps its workers for the run, the
accumulation windows it is cut into, and the evaluation loader.

Batch order is a pure function of (seed, epoch) (the samplers in `tunelab.data.base`), so a resumed run
sees exactly the batches the uninterrupted one saw; random augmentation in workers is reseeded per sample
from (seed, epoch, index) for the same reason.
"""

from __future__ import annotations

import functools
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tunelab.data.base import ResumableBatchSampler


class SeededSamples(Dataset):
    """Seeds the RNGs before each sample from (seed, epoch, index), so random augmentation in DataLoader
    workers is reproducible after a resume (worker RNG state cannot be checkpointed). The epoch travels
    inside the index (`epoch * len(dataset) + index`, see `RunBatches`): workers live across epochs."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.n = dataset, seed, len(dataset)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int) -> Any:
        epoch, index = divmod(key, self.n)
        s = (self.seed * 1_000_003 + epoch * 7_919 + index) % (2**31)
        # The CPU generator only: augmentation runs on CPU here. torch.manual_seed also seeds every
        # accelerator backend, ~60 us per call on a CUDA build, which cost ~8% of a ResNet-18 run's throughput.
        torch.default_generator.manual_seed(s)
        random.seed(s)
        np.random.seed(s)
        return self.dataset[index]


class RunBatches(Sampler[list[int]]):
    """Every epoch's batches, one epoch after another, from (epoch, start) on: the one batch sampler of
    the training DataLoader, iterated once for the whole run. DataLoader workers therefore start once and
    keep prefetching across epoch boundaries (a loader iterated per epoch forks its workers again and
    waits for their first batch every epoch: ~3% of a ResNet-18 run on 2 CPU cores). With `tag`, each
    index carries its epoch (`epoch * n + index`) for `SeededSamples`."""

    def __init__(self, sampler: ResumableBatchSampler, n: int, epoch: int, start: int, tag: bool):
        self.sampler, self.n, self.epoch, self.start, self.tag = sampler, n, epoch, start, tag

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.epoch, self.start
        while True:
            self.sampler.set_epoch(epoch, start=start)
            offset = epoch * self.n if self.tag else 0
            for batch in self.sampler:
                yield [offset + i for i in batch] if offset else batch
            epoch, start = epoch + 1, 0


class FixedBatches(ResumableBatchSampler):
    """A given list of batches (each rank's share of the evaluation batches)."""

    def __init__(self, batches: list[list[int]]):
        super().__init__(sum(map(len, batches)), 1, shuffle=False)
        self._batches = batches

    def epoch_batches(self) -> list[list[int]]:
        return self._batches


def _init_worker(nice: int, worker_id: int) -> None:
    """Deterministic worker RNG before the per-sample reseed; then the worker's nice value raised by
    `nice` (Unix), so under contention the scheduler favours the training process's compute threads."""
    s = torch.initial_seed() % 2**31
    random.seed(s)
    np.random.seed(s)
    if nice > 0 and hasattr(os, "nice"):
        os.nice(nice)  # a worker is one thread (torch sets it to 1 intra-op thread): this covers its work


def make_loader(dataset: Dataset, sampler: Sampler, collate_fn: Any, seed: int, workers: int = 0,
                pin_memory: bool = False, run_from: tuple[int, int] | None = None,
                worker_nice: int = 0) -> DataLoader:
    """A DataLoader over `sampler`'s batches. With `run_from=(epoch, batch)`, the training loader: every
    epoch's batches from there on, one iterator for the run (`RunBatches`). With workers, samples are
    reseeded from (seed, epoch, index) so augmentation resumes exactly (`SeededSamples`), and each worker
    adds `worker_nice` to its nice value (`train.worker_nice`)."""
    if run_from is not None:
        sampler = RunBatches(sampler, len(dataset), *run_from, tag=workers > 0)
    return DataLoader(
        SeededSamples(dataset, seed) if workers > 0 else dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=functools.partial(_init_worker, worker_nice) if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched
    )


@dataclass
class Window:
    """The micro-batches of one optimizer step, how long fetching them took, and where it falls in its
    epoch (the first window of a run counts as starting one: a resume lands mid-epoch)."""

    batches: list[Any]
    data_s: float
    starts_epoch: bool
    ends_epoch: bool


class Windows:
    """Cuts the training loader into accumulation windows of `grad_accum` micro-batches. A window never
    crosses an epoch boundary (the last one of an epoch may be shorter), so `epoch` and `batch_in_epoch`
    describe a resumable position after every step."""

    def __init__(self, loader: DataLoader, batches_per_epoch: int, grad_accum: int, batch_in_epoch: int):
        self.it = iter(loader)
        self.per_epoch, self.grad_accum, self.position = batches_per_epoch, grad_accum, batch_in_epoch
        self.first = True

    def __next__(self) -> Window:
        starts = self.position == 0 or self.first
        n = min(self.per_epoch - self.position, self.grad_accum)
        t0 = time.perf_counter()
        batches = [next(self.it) for _ in range(n)]
        data_s = time.perf_counter() - t0
        self.position += n
        ends = self.position >= self.per_epoch
        if ends:
            self.position = 0
        self.first = False
        return Window(batches, data_s, starts, ends)
