"""CPU threads for training processes that share one machine, and a pool that runs jobs side by side.

Torch starts as many threads as there are cores in every process, so two trainings run
side by side (``dvc queue start -j 2``) each spin that many threads over the same cores,
and both slow down many times over. With ``train.threads: 0`` each training process takes
``cores // trainings running on this machine`` threads instead, counted when it starts and
again at every log interval (a training that finishes gives its cores back). Each running
training holds an flock on one file in :func:`jobs_folder`; the kernel releases it when the
process ends, however it ends, so a killed training is never counted.
"""
from __future__ import annotations

import contextlib
import multiprocessing.context
import os
import tempfile
from pathlib import Path


def jobs_folder() -> Path:
    return Path(tempfile.gettempdir()) / "simformer-trainings"


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:      # not Linux
        return os.cpu_count() or 1


def running(folder: Path) -> int:
    """Trainings running now: the files of ``folder`` whose flock is held (stale files are removed)."""
    import fcntl
    n = 0
    for f in folder.glob("*.lock"):
        try:
            fh = open(f, "rb")
        except OSError:
            continue
        with fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                n += 1          # held by a running training (this one included)
                continue
            with contextlib.suppress(OSError):
                f.unlink()
    return n


class CoreShare:
    """Register this process as a running training for as long as the ``with`` block lasts and
    set torch's threads: ``threads`` when it is > 0, else the fair share (:meth:`rebalance`).
    ``used`` lists the thread counts set, in order (an MLflow tag)."""

    def __init__(self, threads: int = 0, folder: Path | None = None):
        self.fixed = int(threads)
        self.folder = Path(folder) if folder is not None else jobs_folder()
        self.used: list[int] = []
        self._fh = self._path = None

    def __enter__(self) -> "CoreShare":
        if not self.fixed:
            try:
                import fcntl
                self.folder.mkdir(parents=True, exist_ok=True)
                tmp = self.folder / f".{os.getpid()}.tmp"
                self._fh = open(tmp, "a")
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._path = tmp.rename(self.folder / f"{os.getpid()}.lock")   # visible once locked
            except (ImportError, OSError):     # no flock or no writable temp folder: torch's default
                self._fh = None
        self.rebalance()
        return self

    def share(self) -> int:
        if self.fixed:
            return self.fixed
        if self._fh is None:
            return 0
        return max(1, cores() // max(1, running(self.folder)))

    def rebalance(self, *_) -> None:
        """Set torch's threads to :meth:`share` (0 = leave torch's default); usable as ``on_log``."""
        import torch
        n = self.share()
        if n and n != torch.get_num_threads():
            torch.set_num_threads(n)
        if n and (not self.used or self.used[-1] != n):
            self.used.append(n)

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()
            self._fh.close()
            self._fh = None


class _NonDaemonProcess(multiprocessing.context.SpawnProcess):
    """A spawned pool worker that is never daemonic, so that it may start processes of its own.

    multiprocessing.Pool makes its workers daemonic, and a daemonic process may not have children: an
    ablation cell whose training has DataLoader workers (``train.workers`` > 0, as the paper presets
    set for a GPU machine) stopped with "daemonic processes are not allowed to have children".
    :func:`run_parallel` always ends its workers itself (closed and joined, or terminated on a
    failure), so nothing relies on the flag."""

    @property
    def daemon(self) -> bool:
        return False

    @daemon.setter
    def daemon(self, value: bool) -> None:      # the pool sets True: ignored
        pass


class _NonDaemonSpawn(multiprocessing.context.SpawnContext):
    Process = _NonDaemonProcess


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _worker_init() -> None:
    """A pool worker: SIGTERM (the pool stopping it) ends the job like Ctrl-C, so its MLflow run is
    marked KILLED and its last checkpoint is kept."""
    import signal
    signal.signal(signal.SIGTERM, _interrupt)


def _call(task):
    fn, i, job = task
    return i, fn(job)


def run_parallel(fn, jobs: list, workers: int, on_done=None, chunksize: int = 1) -> list:
    """``fn(job)`` for every job, ``workers`` at a time, each in its own process; the results in the
    order of ``jobs``. Jobs start in the order given (put the longest first). ``fn`` must be a
    module-level function; ``on_done(job, result)`` is called in this process as each job ends.
    ``chunksize``: jobs handed to a worker at a time (more than 1 for many short jobs).

    ``workers`` <= 1 (or a single job) runs the jobs here, one after the other. Otherwise the workers
    are spawned processes (never forked: torch's thread pools and CUDA do not survive a fork), not
    daemonic, so that a job may start processes itself (a training's DataLoader workers). The first
    failure stops the others (terminated: SIGTERM, which they turn into KeyboardInterrupt) and is
    raised here, with its own type and message.
    """
    done = on_done or (lambda job, result: None)
    if workers <= 1 or len(jobs) <= 1:
        out = []
        for job in jobs:
            out.append(fn(job))
            done(job, out[-1])
        return out
    from multiprocessing.pool import Pool
    pool = Pool(min(workers, len(jobs)), initializer=_worker_init, context=_NonDaemonSpawn())
    results = {}
    try:
        for i, result in pool.imap_unordered(_call, [(fn, i, job) for i, job in enumerate(jobs)],
                                             chunksize=chunksize):
            results[i] = result
            done(jobs[i], result)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    return [results[i] for i in range(len(jobs))]
