"""Deterministic, resumable data loading.

* :class:`SeededDataset` seeds torch's global RNG per sample from ``(seed, epoch, index)`` while
  the transform runs, so augmentations depend on nothing else: not on the number of workers,
  not on which worker gets the sample, not on resumption.
* :class:`ShardedBatchSampler` shuffles once per epoch from ``(seed, epoch)``, shards the
  permutation over ranks like ``DistributedSampler(drop_last=True)``, cuts it into per-rank
  batches and can skip the first ``start_step`` batches (exact mid-epoch resume).
* :func:`build_loader` puts both into a :class:`Loader`. The sampler hands ``(epoch, index)``
  pairs to the dataset, so ``loader.batch_sampler.set_epoch(e)`` reaches the augmentation even in
  persistent workers.
* :class:`Loader` is a ``torch.utils.data.DataLoader`` through which an :class:`OperaError`
  raised in a worker (a corrupt image, ...) reaches the caller as the worker's own one line, not
  as torch's ``Caught OperaError in DataLoader worker process N`` traceback.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import repeat

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from opera.errors import OperaError

_MASK64 = (1 << 64) - 1

# torch's ExceptionWrapper.reraise: "Caught {type name} {where}.\nOriginal Traceback (most recent
# call last): ...", ending with the worker's "module.Class: message" line
_CAUGHT = re.compile(r"Caught (\w+) in .+?\.\s+Original Traceback \(most recent call last\):")


def worker_error(exc: BaseException) -> OperaError | None:
    """The worker's own :class:`OperaError` behind ``exc``, when ``exc`` is torch's re-raise of
    an ``OperaError`` (or subclass) from a DataLoader worker; ``None`` for anything else.

    torch re-raises the worker's exception class with the quoted traceback as its message (an
    ``OperaError`` flattens it to one line), or a ``RuntimeError`` holding it when the class takes
    other arguments (:class:`~opera.engine.checkpoint.CheckpointUnreadable`). The worker's message
    is what follows the last ``module.Class: `` of that traceback. The result is the same class
    when it is built from a message alone, else a plain ``OperaError``; both exit with code 2.
    """
    if not isinstance(exc, (OperaError, RuntimeError)):
        return None
    text = str(exc)
    caught = _CAUGHT.match(text)
    if caught is None:
        return None
    name = caught.group(1)
    if isinstance(exc, OperaError):
        if type(exc).__name__ != name:
            return None
        kind: type = type(exc)
        head = f"{kind.__module__}.{kind.__qualname__}: "
        start = text.rfind(head)
        if start < 0:
            return None
        message = text[start + len(head):]
    else:  # the class could not be rebuilt from the message: find it by its traceback line
        lines = list(re.finditer(rf"^((?:\w+\.)+){re.escape(name)}: (.*)$", text, re.MULTILINE))
        if not lines:
            return None
        last = lines[-1]
        # the class came along, pickled by reference, so its module is imported: look, import nothing
        kind = getattr(sys.modules.get(last.group(1)[:-1]), name, None)
        if not (isinstance(kind, type) and issubclass(kind, OperaError)):
            return None
        message = last.group(2)
    try:
        return kind(message)
    except TypeError:
        return OperaError(message)


class _WorkerErrors:
    """An iterator of a :class:`Loader`: the DataLoader's own, with workers' ``OperaError`` unwrapped."""

    def __init__(self, it):
        self._it = it

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._it)
        except (OperaError, RuntimeError) as exc:
            own = worker_error(exc)
            if own is None:
                raise
            raise own from None

    def __len__(self) -> int:
        return len(self._it)

    def __getattr__(self, name: str):
        if name == "_it":
            raise AttributeError(name)
        return getattr(self._it, name)


class Loader(DataLoader):
    """``torch.utils.data.DataLoader`` whose iterators raise an :class:`OperaError` from a worker
    process as the worker's own one-line error (:func:`worker_error`), the same as with
    ``num_workers=0``. Every other exception passes unchanged."""

    def __iter__(self):
        return _WorkerErrors(super().__iter__())


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed from ``(seed, epoch, index)``; no Python ``hash()`` involved."""
    h = _splitmix64(int(seed) & _MASK64)
    h = _splitmix64(h ^ (int(epoch) & _MASK64))
    h = _splitmix64(h ^ (int(index) & _MASK64))
    return h & ((1 << 63) - 1)


class SeededDataset(Dataset):
    """Wrap ``dataset`` so that item ``i`` of epoch ``e`` is drawn under seed ``(seed, e, i)``.

    ``dataset[i]`` uses the epoch set by :meth:`set_epoch`; ``dataset[(e, i)]`` uses epoch ``e``
    (what :func:`build_loader`'s sampler sends). The global RNG state of the caller is restored
    afterwards (``torch.random.fork_rng``). Attributes of the wrapped dataset (``num_classes``,
    ``targets``, ...) are readable through the wrapper.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key):
        if isinstance(key, tuple):
            epoch, index = key
        else:
            epoch, index = self.epoch, key
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only (what the transforms draw from, and all that fork_rng restores):
            # torch.manual_seed would also reseed every CUDA generator (left changed) and, before
            # CUDA is initialised, format three stack traces per call (a quarter of a worker's time).
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            return self.dataset[index]

    def __getattr__(self, name: str):
        # Never forward "dataset" (unset during unpickling) or dunders: DataLoader would pick
        # up e.g. a wrapped Subset's __getitems__ and bypass the seeding.
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)


def epoch_permutation_array(n: int, seed: int, epoch: int) -> np.ndarray:
    """:func:`epoch_permutation` as an int64 numpy array (no Python int per element)."""
    g = torch.Generator()
    g.manual_seed(sample_seed(seed, epoch, -1))
    return torch.randperm(n, generator=g).numpy()


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The epoch's order of ``range(n)``: a permutation drawn from ``(seed, epoch)``."""
    if not shuffle:
        return list(range(n))
    return epoch_permutation_array(n, seed, epoch).tolist()


class ShardedBatchSampler(Sampler[list]):
    """Per-rank batches of one epoch; deterministic from ``(seed, epoch)``.

    The epoch's permutation is truncated to a multiple of ``world_size`` (like
    ``DistributedSampler(drop_last=True)``; without ``drop_last`` nothing is dropped and ranks may
    differ by one sample) and rank ``r`` takes every ``world_size``-th index from ``r``; its
    share is cut into batches of ``batch_size`` (the last, short one is dropped with
    ``drop_last``). The first ``start_step`` batches are skipped. With ``seeded=True`` each
    index is yielded as ``(epoch, index)`` for :class:`SeededDataset`.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        seeded: bool = False,
    ):
        if world_size < 1 or not (0 <= rank < world_size):
            raise ValueError(f"bad rank {rank} for world size {world_size}")
        if batch_size < 1:
            raise OperaError(f"batch size must be >= 1, got {batch_size}; use --batch-size >= 1")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.seeded = seeded
        self.set_epoch(epoch, start_step)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Switch to ``epoch``, skipping its first ``start_step`` batches."""
        self.epoch = int(epoch)
        total = self.steps_in_epoch()
        if not (0 <= start_step <= total):
            raise ValueError(f"start_step {start_step} is outside 0..{total} (steps per epoch)")
        self.start_step = int(start_step)

    def _rank_indices(self) -> list[int]:
        perm = epoch_permutation(self.num_samples, self.seed, self.epoch, self.shuffle)
        if self.drop_last:
            perm = perm[: (len(perm) // self.world_size) * self.world_size]
        return perm[self.rank :: self.world_size]

    def steps_in_epoch(self) -> int:
        per_rank = (
            self.num_samples // self.world_size
            if self.drop_last
            else -(-(self.num_samples - self.rank) // self.world_size)
        )
        if self.drop_last:
            return per_rank // self.batch_size
        return -(-per_rank // self.batch_size)

    def __len__(self) -> int:
        return self.steps_in_epoch() - self.start_step

    def __iter__(self) -> Iterator[list]:
        idx = self._rank_indices()
        bs = self.batch_size
        for step in range(self.start_step, self.steps_in_epoch()):
            batch = idx[step * bs : (step + 1) * bs]
            yield [(self.epoch, i) for i in batch] if self.seeded else batch


class LabelledShareBatchSampler(Sampler[list]):
    """Per-rank batches with exactly ``labelled_per_batch`` labelled images per *global* batch
    (``data.labelled_per_batch``; ``labelled_per_batch / world_size`` on every rank).

    The labelled and the unlabelled images are two streams, each an endless sequence of seeded
    permutations of its pool (cycle ``c`` of a pool: drawn from ``(seed, c)``); global step ``s``
    of epoch ``e`` takes the next ``k`` labelled and ``B - k`` unlabelled items, so every batch is a
    function of ``(seed, epoch, step)`` alone (exact mid-epoch resume via ``start_step``) and at
    1% labels the few labelled images recur, instead of a batch of 256 holding about 2 of them.
    An epoch has as many steps as :class:`ShardedBatchSampler`'s (``len // global batch``).

    Each stream draws a cycle's permutation once, when its first step is asked for, gathers the
    pool in that order once (``pool[perm]``) and keeps the result while the steps walk it: a step
    is one slice of each stream, joined and turned into a list; O(B) a step and O(N) an epoch (a
    cycle is about an epoch of the pool). :attr:`work` counts the index elements drawn, gathered
    and sliced so far.

    A cycle's permutation (``torch.randperm`` of the pool, which dominates the sampler's time at
    ImageNet scale: about 20-70 ns an element, so ~4-13 us per step of 192 unlabelled images) is
    drawn ahead, on one background thread, when the previous cycle comes into use, so a step
    does not wait for it (``prefetch=False``: drawn on the step that needs it). The draw depends
    only on ``(seed, tag, cycle)``, so the batches are the same either way.
    """

    def __init__(self, labelled, unlabelled, batch_size: int, labelled_per_batch: int, *,
                 seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1, start_step: int = 0,
                 seeded: bool = False, prefetch: bool = True):
        global_batch, k = batch_size * world_size, int(labelled_per_batch)
        if not 0 < k <= global_batch:
            raise OperaError(f"data.labelled_per_batch {k} is outside 1..{global_batch} (the global batch); "
                             "use --set data.labelled_per_batch=N with 0 < N <= the batch size, or 0 for random batches")
        if k % world_size:
            raise OperaError(f"data.labelled_per_batch {k} is not divisible by the {world_size} processes; "
                             f"use a multiple of {world_size}")
        if not len(labelled):
            raise OperaError("data.labelled_per_batch needs labelled images, but none has a label; check --labels")
        if len(labelled) < k:
            raise OperaError(f"data.labelled_per_batch {k} is more than the {len(labelled)} labelled images; "
                             f"use --set data.labelled_per_batch={len(labelled) - len(labelled) % world_size} or fewer")
        if len(unlabelled) < global_batch - k:
            raise OperaError(f"data.labelled_per_batch {k} leaves {global_batch - k} places per batch for the "
                             f"{len(unlabelled)} unlabelled images; use a larger data.labelled_per_batch or 0")
        # numpy arrays, not lists: shared by reference, gathered a batch at a time
        self.labelled = np.asarray(labelled, dtype=np.int64)
        self.unlabelled = np.asarray(unlabelled, dtype=np.int64)
        self.batch_size, self.k = int(batch_size), k
        self.seed, self.rank, self.world_size, self.seeded = int(seed), int(rank), int(world_size), seeded
        self.n_steps = ((len(self.labelled) + len(self.unlabelled)) // world_size) // self.batch_size
        self._cycles: dict[int, tuple[int, np.ndarray]] = {}  # tag -> (cycle, the pool in its order)
        self.prefetch = bool(prefetch)
        self._ahead: dict[int, tuple[int, Future]] = {}  # tag -> (cycle, the pool in its order, being drawn)
        self._pool: ThreadPoolExecutor | None = None
        #: index elements drawn (permutations) and gathered (batches) so far: the sampler's work
        self.work = 0
        self.set_epoch(epoch, start_step)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not (0 <= start_step <= self.n_steps):
            raise ValueError(f"start_step {start_step} is outside 0..{self.n_steps} (steps per epoch)")
        self.epoch, self.start_step = int(epoch), int(start_step)

    def steps_in_epoch(self) -> int:
        return self.n_steps

    def __len__(self) -> int:
        return self.n_steps - self.start_step

    def _draw(self, pool: np.ndarray, c: int, tag: int) -> np.ndarray:
        return pool[epoch_permutation_array(len(pool), sample_seed(self.seed, tag, c), c)]

    def _cycle(self, pool: np.ndarray, c: int, tag: int) -> np.ndarray:
        """``pool`` in the order of its cycle ``c``'s permutation (``tag``: which pool), drawn and
        gathered once per cycle (ahead, on the background thread, with ``prefetch``)."""
        held = self._cycles.get(tag)
        if held is None or held[0] != c:
            del held  # the previous cycle's array is freed before the next is gathered
            self._cycles.pop(tag, None)
            ahead = self._ahead.pop(tag, None)
            items = ahead[1].result() if ahead is not None and ahead[0] == c else self._draw(pool, c, tag)
            self.work += 2 * len(pool)
            self._cycles[tag] = (c, items)
            if self.prefetch:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opera-sampler")
                self._ahead[tag] = (c + 1, self._pool.submit(self._draw, pool, c + 1, tag))
            return items
        return held[1]

    def __getstate__(self):  # a copy or a pickle draws its cycles itself
        return {**self.__dict__, "_ahead": {}, "_pool": None}

    def _stream(self, pool: np.ndarray, g: int, per_global: int, offset: int, count: int, tag: int) -> np.ndarray:
        """Items ``offset..offset+count`` of global step ``g``'s ``per_global`` items of ``pool`` (a
        view of the cycle's array): cycle ``c`` holds ``len(pool) // per_global`` whole steps of one
        permutation (its remainder is dropped), so no global batch repeats an image."""
        steps_per_cycle = len(pool) // per_global
        c = g // steps_per_cycle
        start = (g % steps_per_cycle) * per_global + offset
        self.work += count
        return self._cycle(pool, c, tag)[start: start + count]

    def __iter__(self) -> Iterator[list]:
        return self._batches(self.epoch, self.start_step)  # this epoch's, whatever set_epoch does meanwhile

    def _batches(self, epoch: int, start_step: int) -> Iterator[list]:
        k_rank = self.k // self.world_size
        u_rank = self.batch_size - k_rank
        u_global = self.batch_size * self.world_size - self.k
        for step in range(start_step, self.n_steps):
            g = epoch * self.n_steps + step  # the global step: the streams run on across epochs
            labelled = self._stream(self.labelled, g, self.k, self.rank * k_rank, k_rank, -3)
            if u_rank:
                unlabelled = self._stream(self.unlabelled, g, u_global, self.rank * u_rank, u_rank, -4)
                batch = np.concatenate((labelled, unlabelled)).tolist()
            else:
                batch = labelled.tolist()
            yield list(zip(repeat(epoch), batch)) if self.seeded else batch


def steps_per_epoch(
    len_dataset: int, global_batch: int, world_size: int = 1, drop_last: bool = True
) -> int:
    """Optimizer steps per epoch for a global batch split evenly over ``world_size`` ranks."""
    if global_batch < 1:
        raise OperaError(f"batch size must be >= 1, got {global_batch}; use --batch-size >= 1")
    if global_batch % world_size:
        raise OperaError(
            f"global batch size {global_batch} is not divisible by the {world_size} processes; "
            f"use a --batch-size that is a multiple of {world_size}"
        )
    per_rank_batch = global_batch // world_size
    if drop_last:
        return (len_dataset // world_size) // per_rank_batch
    per_rank = -(-len_dataset // world_size)  # rank 0's share, the largest
    return -(-per_rank // per_rank_batch)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    drop_last: bool = True,
    workers: int = 0,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    pin_memory: bool | str = "auto",
    persistent_workers: bool | str = "auto",
    prefetch_factor: int | str | None = "auto",
    batch_sampler: Sampler | None = None,
) -> Loader:
    """A :class:`Loader` over this rank's batches of epoch ``epoch`` (``batch_size`` per process).

    ``dataset`` is wrapped in :class:`SeededDataset` (unless it already is one) so augmentation
    depends only on ``(seed, epoch, index)``. The first ``start_step`` batches are skipped (exact
    mid-epoch resume). For later epochs call ``loader.batch_sampler.set_epoch(epoch)`` (works
    with persistent workers) or build a new loader. ``"auto"``: ``pin_memory`` when CUDA is
    available; ``persistent_workers`` when ``workers > 0``; ``prefetch_factor`` 2 with workers.

    Raises :class:`OperaError` when ``drop_last`` and the global batch (``batch_size *
    world_size``) is larger than the dataset (the epoch would have no step).
    """
    n = len(dataset)  # type: ignore[arg-type]
    if batch_size < 1:
        raise OperaError(f"batch size must be >= 1, got {batch_size}; use --batch-size >= 1")
    if workers < 0:
        raise OperaError(f"workers must be >= 0, got {workers}; use --workers 0 or more")
    if n == 0:
        raise OperaError("the dataset is empty; check the data spec")
    global_batch = batch_size * world_size
    if drop_last and global_batch > n:
        raise OperaError(
            f"batch size {global_batch} is larger than the dataset ({n} images); "
            f"use --batch-size <= {n}"
        )
    ds = dataset if isinstance(dataset, SeededDataset) else SeededDataset(dataset, seed)
    ds.set_epoch(epoch)
    sampler = batch_sampler or ShardedBatchSampler(
        n,
        batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        start_step=start_step,
        seeded=True,
    )
    if pin_memory == "auto":
        pin_memory = torch.cuda.is_available()
    if persistent_workers == "auto":
        persistent_workers = workers > 0
    if prefetch_factor == "auto":
        prefetch_factor = 2 if workers > 0 else None
    return Loader(
        ds,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=bool(pin_memory),
        persistent_workers=bool(persistent_workers) and workers > 0,
        prefetch_factor=prefetch_factor if workers > 0 else None,
    )


class IndexedSeededDataset(SeededDataset):
    """:class:`SeededDataset` whose items end with their dataset index: ``(image, label, index)``,
    so the feed can look up every named label set of the batch."""

    def __getitem__(self, key):
        index = key[1] if isinstance(key, tuple) else key
        return (*super().__getitem__(key), index)


AUGMENT_ON = ("device", "workers")


def in_memory_images(dataset) -> torch.Tensor | None:
    """The dataset's decoded uint8 ``[N, 3, H, W]`` images when it holds them all (digits), else None."""
    images = getattr(dataset, "images", None)
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4 \
            and images.shape[1] == 3 and images.shape[0] == len(dataset):
        return images
    return None


class PretrainFeed:
    """Batches of MoCo-v3 two-crop views, on ``device``, for the pretraining loop (Eq. 34's views),
    then ``local_crops`` DINO local crops of ``local_size`` px when asked (multi-crop).

    ``augment_on="workers"``: ``PretrainTransform`` per image in the DataLoader (the classic way).
    ``augment_on="device"`` (default): ``opera.data.device_augment.BatchTwoCrop`` on whole
    batches on the device. A dataset that holds its decoded images (digits) is copied to the
    device once and indexed there - no DataLoader, no workers (``workers`` is unused); a folder is
    decoded and cropped (uint8) in ``workers`` and the rest runs batched on the device.

    The labels of a batch are a dict of named label sets (``{"class": y, "coarse": c}``), from
    ``target_sets`` (``{name: per-image labels}``, ``-1`` = no label) or else the dataset's own.

    Every sample's augmentation depends only on ``(seed, epoch, index)``, in both modes and in
    both device paths (the same parameters as ``PretrainTransform`` draws under that seed), and
    the batch order only on ``(seed, epoch)``: ``epoch(..., start_step=k)`` yields exactly the
    batches ``k, k+1, ...`` of an uninterrupted epoch (exact resume).
    """

    def __init__(self, dataset, *, img_size: int, crop_min: float, flip: bool, seed: int, augment_on: str = "device",
                 device: torch.device | str = "cpu", workers: int = 0, target_sets: dict | None = None,
                 labelled_per_batch: int = 0, local_crops: int = 0, local_size: int = 0,
                 local_scale: tuple[float, float] = (0.05, 0.4)):
        from opera.data.datasets import dataset_label_sets, dataset_target_sets
        from opera.data.device_augment import BatchTwoCrop, CropForDevice
        from opera.data.transforms import PretrainTransform

        if augment_on not in AUGMENT_ON:
            raise OperaError(f"data.augment_on must be one of {', '.join(AUGMENT_ON)}, got {augment_on!r}; "
                             "use --set data.augment_on=device")
        self.augment_on, self.device, self.workers, self.seed = augment_on, torch.device(device), int(workers), int(seed)
        multi = {"local_crops": local_crops, "local_size": local_size, "local_scale": tuple(local_scale)}
        self.two_crop = BatchTwoCrop(img_size, crop_min=crop_min, flip=flip, **multi)
        #: how many leading views of a batch are global (the rest are DINO's local crops)
        self.global_views = 2
        images = in_memory_images(dataset) if augment_on == "device" else None
        self.in_memory = images is not None
        self.label_sets = dataset_label_sets(dataset)
        sets = dataset_target_sets(dataset) if target_sets is None else target_sets
        for name, values in sets.items():
            if len(values) != len(dataset):
                raise OperaError(f"label set {name!r} has {len(values)} labels for {len(dataset)} images; give one per image")
        self.target_sets = {name: torch.as_tensor(values, dtype=torch.int64).to(self.device) for name, values in sets.items()}
        self.labelled_per_batch = int(labelled_per_batch)
        if self.labelled_per_batch:  # "labelled" = has a label in the class set (or in any set without one)
            has = torch.as_tensor(sets["class"] if "class" in sets else next(iter(sets.values()))) >= 0
            self.labelled_index = torch.nonzero(has).flatten().numpy()
            self.unlabelled_index = torch.nonzero(~has).flatten().numpy()
        self._samplers: dict[tuple, LabelledShareBatchSampler] = {}
        self._loaders: dict[tuple, Loader] = {}
        if self.in_memory:
            self.images = images.to(self.device)  # once; every step indexes it on the device
            dataset.transform = None
        elif augment_on == "device":
            dataset.transform = CropForDevice(self.two_crop)
        else:
            dataset.transform = PretrainTransform(img_size, crop_min=crop_min, flip=flip, **multi)
        base = dataset.dataset if isinstance(dataset, SeededDataset) else dataset
        self.dataset = IndexedSeededDataset(base, seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def batch_sampler(self, batch_size: int, epoch: int, rank: int, world_size: int, start_step: int,
                      seeded: bool) -> Sampler | None:
        """The :class:`LabelledShareBatchSampler` when ``labelled_per_batch`` is set, else None (plain).
        One sampler per shape, kept across epochs: its streams' permutations outlive the epoch."""
        if not self.labelled_per_batch:
            return None
        key = (batch_size, rank, world_size, seeded)
        sampler = self._samplers.get(key)
        if sampler is None:
            sampler = self._samplers[key] = LabelledShareBatchSampler(
                self.labelled_index, self.unlabelled_index, batch_size, self.labelled_per_batch, seed=self.seed,
                epoch=epoch, rank=rank, world_size=world_size, start_step=start_step, seeded=seeded)
        else:
            sampler.set_epoch(epoch, start_step)
        return sampler

    def epoch(self, batch_size: int, epoch: int, *, rank: int = 0, world_size: int = 1, start_step: int = 0,
              shuffle: bool = True, drop_last: bool = True) -> Iterator[tuple[list[torch.Tensor], dict[str, torch.Tensor]]]:
        """``(views, targets)`` on the device for this rank's batches of ``epoch`` from ``start_step``
        (``targets``: the named label sets of the batch)."""
        self.dataset.set_epoch(epoch)
        if self.in_memory:
            yield from self._in_memory_epoch(batch_size, epoch, rank, world_size, start_step, shuffle, drop_last)
            return
        for items, _, index in self.loader(batch_size, epoch, rank, world_size, start_step, shuffle, drop_last):
            targets = self.targets_of(index.to(self.device, non_blocking=True))
            if self.augment_on == "workers":
                yield [v.to(self.device, non_blocking=True) for v in items], targets
            else:
                *crops, params = items
                crops = [c.to(self.device, non_blocking=True) for c in crops]
                yield self.two_crop.from_crops(*crops[:1], params, *crops[1:]), targets

    def loader(self, batch_size: int, epoch: int, rank: int, world_size: int, start_step: int, shuffle: bool,
               drop_last: bool) -> Loader:
        """The folder path's :class:`Loader`, one per shape, kept across epochs with persistent
        workers: its sampler is switched to ``(epoch, start_step)`` and hands ``(epoch, index)`` keys
        to the workers, so the batches and their augmentation are those of a loader built for the
        epoch. The workers are forked once, at the first epoch: a loader rebuilt every epoch forks
        them again from the main process as it is then (its heap grown by the steps), and each
        new worker's RSS starts at that size (BENCHMARKS.md, end to end)."""
        key = (batch_size, rank, world_size, shuffle, drop_last)
        sampler = self.batch_sampler(batch_size, epoch, rank, world_size, start_step, True)
        loader = self._loaders.get(key)
        if loader is None:
            loader = self._loaders[key] = build_loader(
                self.dataset, batch_size, shuffle=shuffle, drop_last=drop_last, workers=self.workers, seed=self.seed,
                epoch=epoch, rank=rank, world_size=world_size, start_step=start_step, batch_sampler=sampler)
        elif sampler is None:
            loader.batch_sampler.set_epoch(epoch, start_step)
        return loader

    def start_workers(self, batch_size: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                      drop_last: bool = True) -> None:
        """Fork the folder path's DataLoader workers now (nothing without workers or in memory).

        A forked worker's RSS starts at the main process's resident heap at the fork, so forking
        before the model, the optimizer and a resumed checkpoint exist keeps every worker that much
        smaller (resnet18 with LARS: ~180 MB less VmHWM per worker). The workers start on epoch 0's
        first batches; :meth:`epoch` then switches the sampler and the DataLoader drops what they
        fetched meanwhile (torch's persistent-worker reset), so the batches are unchanged."""
        if self.in_memory or not self.workers:
            return
        loader = self.loader(batch_size, 0, rank, world_size, 0, shuffle, drop_last)
        iter(loader)  # forks the workers (persistent: the loader keeps them and this iterator)

    def targets_of(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named label sets of the images ``index`` (a tensor of dataset indices on the device)."""
        return {name: values.index_select(0, index) for name, values in self.target_sets.items()}

    def _in_memory_epoch(self, batch_size, epoch, rank, world_size, start_step, shuffle, drop_last):
        n = len(self.dataset)
        if drop_last and batch_size * world_size > n:
            raise OperaError(f"batch size {batch_size * world_size} is larger than the dataset ({n} images); "
                             f"use --batch-size <= {n}")
        sampler = self.batch_sampler(batch_size, epoch, rank, world_size, start_step, False) or ShardedBatchSampler(
            n, batch_size, shuffle=shuffle, drop_last=drop_last, seed=self.seed, epoch=epoch, rank=rank,
            world_size=world_size, start_step=start_step)
        hw = tuple(self.images.shape[-2:])
        for batch in sampler:
            params = self.two_crop.sample_seeded([sample_seed(self.seed, epoch, i) for i in batch], [hw] * len(batch))
            idx = torch.as_tensor(batch, dtype=torch.int64).to(self.device)
            yield self.two_crop(self.images.index_select(0, idx), params), self.targets_of(idx)
