"""Compiled in-place scatter for large patches.

The serving pause of a delta load is the in-place apply. With an undo it is one
gather of the old bits and one scatter of the new bits per changed element:
numpy's fancy indexing does that in two passes at ~5 ns an element; `swap_in`
fuses them in one pass, GIL released, over slices on a small thread pool (30M
changes: ~270 ms -> ~60 ms on two cores). Without an undo (a replica's hot-load:
a failed apply is restored from source) `write_all` only scatters, and spreads
the slices of every tensor of a load over the pool at once, so the many tensors
too small to split no longer run one after another (0.6B shape, 3 % changed:
118 ms -> 58 ms on two cores, `benchmarks/apply_bench.py`). Threads are plain
Python threads (no numba threading layer, so no OpenMP runtime can clash with
torch's).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

#: Patches smaller than this use numpy (no JIT compile for tiny tensors).
KERNEL_MIN_ELEMENTS = 1 << 16
#: Changed elements per slice handed to one thread: small enough that a single
#: tensor's patch (often ~100K changes) is spread over both cores.
_SLICE_ELEMENTS = 1 << 16

#: Dense elements per slice of `write_all` (a plain copy; numpy releases the GIL).
_DENSE_SLICE_ELEMENTS = 1 << 22

_POOL_THREADS = max(1, os.cpu_count() or 1)
_POOL = ThreadPoolExecutor(max_workers=_POOL_THREADS, thread_name_prefix="patch")


@njit(nogil=True, cache=True)  # type: ignore[untyped-decorator]
def _swap_slice(  # noqa: PLR0917  (a numba kernel: positional only)
    view: np.ndarray, positions: np.ndarray, values: np.ndarray, old: np.ndarray, lo: int, hi: int
) -> int:
    """old[i] = view[p]; view[p] = values[i] for p = positions[i], lo <= i < hi.

    Returns how many positions were out of range (those are skipped).
    """
    size = view.size
    bad = 0
    for i in range(lo, hi):
        p = positions[i]
        if p < 0 or p >= size:
            bad += 1
            continue
        old[i] = view[p]
        view[p] = values[i]
    return bad


@njit(nogil=True, cache=True)  # type: ignore[untyped-decorator]
def _restore_slice(
    view: np.ndarray, positions: np.ndarray, old: np.ndarray, lo: int, hi: int
) -> None:
    size = view.size
    for i in range(lo, hi):
        p = positions[i]
        if 0 <= p < size:
            view[p] = old[i]


@njit(nogil=True, cache=True)  # type: ignore[untyped-decorator]
def _write_rising(
    view: np.ndarray, positions: np.ndarray, values: np.ndarray, lo: int, hi: int
) -> bool:
    """view[p] = values[i] for p = positions[i], lo <= i < hi, while p rises strictly
    from positions[lo - 1] (-1 at 0) and stays inside `view`; False where it stops."""
    prev = positions[lo - 1] if lo > 0 else -1
    size = view.size
    for i in range(lo, hi):
        p = positions[i]
        if p <= prev or p >= size:
            return False
        view[p] = values[i]
        prev = p
    return True


@njit(nogil=True, cache=True)  # type: ignore[untyped-decorator]
def _scatter_sorted(out: np.ndarray, positions: np.ndarray, values: np.ndarray, start: int) -> bool:
    """out[p - start] = values[i] for p = positions[i]; False (stopped) at the first
    position that is not above the one before it or not inside `out`."""
    prev = start - 1
    stop = start + out.size
    for i in range(positions.size):
        p = positions[i]
        if p <= prev or p >= stop:
            return False
        out[p - start] = values[i]
        prev = p
    return True


def scatter_sorted(out: np.ndarray, positions: np.ndarray, values: np.ndarray, start: int) -> bool:
    """Write `values` at `positions - start` of `out`, checking as it goes that the
    positions are strictly increasing and inside `[start, start + out.size)`.

    Returns False when they are not (`out` is then partly written: scratch only).
    One pass, no temporaries: the verify of a delta calls this once per chunk.
    """
    if positions.size < KERNEL_MIN_ELEMENTS:
        if positions.size == 0:
            return True
        if positions[0] < start or positions[-1] >= start + out.size:
            return False
        if np.any(positions[1:] <= positions[:-1]):
            return False
        out[positions - start] = values
        return True
    return bool(_scatter_sorted(out, positions.astype(np.int64, copy=False), values, start))


def swap_in(view: np.ndarray, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Write `values` at `positions` of `view` in place; return the bits they replaced.

    `positions` must be unique (a patch's are sorted and unique). Any position
    outside `view` raises `IndexError` and leaves `view` unchanged.
    """
    if positions.size < KERNEL_MIN_ELEMENTS:
        if positions.size and (int(positions.min()) < 0 or int(positions.max()) >= view.size):
            raise IndexError(f"patch positions are outside the tensor's {view.size} elements")
        old: np.ndarray = view[positions]
        view[positions] = values
        return old
    positions = positions.astype(np.int64, copy=False)
    old = np.empty(positions.size, dtype=view.dtype)
    bounds = [
        (lo, min(lo + _SLICE_ELEMENTS, positions.size))
        for lo in range(0, positions.size, _SLICE_ELEMENTS)
    ]
    bad = sum(
        _POOL.map(lambda b: int(_swap_slice(view, positions, values, old, b[0], b[1])), bounds)
    )
    if bad:
        # All or nothing: put back what the in-range positions held.
        list(_POOL.map(lambda b: _restore_slice(view, positions, old, b[0], b[1]), bounds))
        raise IndexError(f"{bad} patch positions are outside the tensor's {view.size} elements")
    return old


#: One item of `write_all`: a flat view, its patch's positions (None: dense) and values.
WriteItem = tuple[np.ndarray, np.ndarray | None, np.ndarray]


def write_all(items: Sequence[WriteItem], *, threads: int | None = None) -> None:
    """`view[positions] = values` (`view[:] = values` when dense) for every item, in place.

    No undo is built, and all the items' work (slices of up to 64K changes or 4M dense
    elements) is split over the pool's threads by size, each thread taking a run of
    slices in order. Sparse positions must be strictly increasing, as every decoder's
    are (a delta's verify refuses others): an item whose first or last position lies
    outside its view, or a dense item of the wrong size, raises before anything is
    written (`IndexError`, `ValueError`); positions found out of order while writing
    raise `ValueError` with the items partly written, which only a caller that can
    restore the weights from their source may accept. No write ever leaves a view.
    `threads=1` writes on the calling thread only (a background caller's share).
    """
    most = _POOL_THREADS if threads is None else max(1, min(threads, _POOL_THREADS))
    jobs: list[_Job] = []
    for view, positions, values in items:
        if positions is None:
            if values.size != view.size:
                raise ValueError(
                    f"a dense patch of {values.size} values cannot fill {view.size} elements"
                )
            # Copying is ~8x cheaper per element than scattering.
            jobs += _slices((view, None, values), view.size, _DENSE_SLICE_ELEMENTS, cost=8)
            continue
        if positions.size != values.size:
            raise ValueError(f"{positions.size} positions but {values.size} values")
        if not positions.size:
            continue
        if int(positions[0]) < 0 or int(positions[-1]) >= view.size:
            raise IndexError(f"patch positions are outside the tensor's {view.size} elements")
        item = (view, positions.astype(np.int64, copy=False), values)
        jobs += _slices(item, positions.size, _SLICE_ELEMENTS, cost=1)
    if not jobs:
        return
    work = sum(job[0] for job in jobs)
    threads = min(most, -(-work // _SLICE_ELEMENTS))
    # Less than a slice's work is written here: handing it to the pool costs more.
    # Every run is waited for before anything is raised: no thread writes after the call.
    if threads <= 1:
        if _write_run(jobs):
            return
    elif all(list(_POOL.map(_write_run, _runs(jobs, threads)))):
        return
    raise ValueError(
        "patch positions are not strictly increasing (unsorted or repeated); the tensors "
        "are partly written"
    )


#: One slice of a `write_all` item: (work, item, lo, hi).
_Job = tuple[int, WriteItem, int, int]


def _slices(item: WriteItem, size: int, step: int, cost: int) -> list[_Job]:
    """`item`'s elements [0, size) cut into slices of `step`, each weighed size / cost."""
    return [
        (max(1, (min(lo + step, size) - lo) // cost), item, lo, min(lo + step, size))
        for lo in range(0, size, step)
    ]


def _runs(jobs: list[_Job], count: int) -> list[list[_Job]]:
    """`jobs` cut, in order, into at most `count` runs of about equal work."""
    share = -(-sum(job[0] for job in jobs) // count)
    runs: list[list[_Job]] = [[]]
    done = 0
    for job in jobs:
        if done >= share * len(runs) and len(runs) < count:
            runs.append([])
        runs[-1].append(job)
        done += job[0]
    return runs


def _write_run(run: list[_Job]) -> bool:
    ok = True
    for _, (view, positions, values), lo, hi in run:
        if positions is None:
            view[lo:hi] = values[lo:hi]
        elif not _write_rising(view, positions, values, lo, hi):
            ok = False
    return ok


def warm_up() -> None:
    """Compile (or load from numba's on-disk cache) the kernels for every bit width.

    The first call otherwise costs ~0.3 s, which would land inside the first
    delta's serving pause; a replica calls this while it starts.
    """
    for dtype in (np.uint8, np.uint16, np.uint32):
        view = np.zeros(KERNEL_MIN_ELEMENTS, dtype=dtype)
        positions = np.arange(KERNEL_MIN_ELEMENTS, dtype=np.int64)
        swap_in(view, positions, np.ones(KERNEL_MIN_ELEMENTS, dtype=dtype))
        scatter_sorted(view, positions, np.zeros(KERNEL_MIN_ELEMENTS, dtype=dtype), 0)
        write_all([(view, positions, np.zeros(KERNEL_MIN_ELEMENTS, dtype=dtype))])
