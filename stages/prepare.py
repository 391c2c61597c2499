"""DVC stage `prepare`: write the weak-shot split (base / novel classes) and the per-image
index (image-level labels, usability, class -> images) for the chosen data.split."""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from stages._common import load_params, parser, run


@contextlib.contextmanager
def quiet_pool_workers():
    """Let forked pool workers die silently on SIGTERM.

    ``run`` makes SIGTERM raise ``KeyboardInterrupt`` (a clean unwind of the stage); forked
    label-scan workers inherit that handler, and ``multiprocessing.Pool`` stops its workers
    with SIGTERM when it closes, so every worker printed a ``KeyboardInterrupt: signal 15``
    traceback on a successful run. Inside this block the handler keeps its behaviour in this
    process and, in any other process (a forked worker), restores the default action and
    re-sends the signal: the worker ends at once, without a traceback.
    """
    main_pid = os.getpid()
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        if os.getpid() == main_pid:
            if callable(previous):
                previous(signum, frame)
            if previous == signal.SIG_IGN or callable(previous):
                return
        signal.signal(signum, signal.SIG_DFL)  # a forked worker (or no handler before): default action
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--dataset-dir", type=Path, required=True, help="prepared dataset folder")
    ap.add_argument("--out", type=Path, required=True, help="split folder to write (split.json, index.json)")
    args = ap.parse_args()
    p, _ = load_params(args.params)
    from pipeline.data.splits import build_split, write_split
    with quiet_pool_workers():
        split, index = build_split(args.dataset_dir, p.data.dataset, p.data.split,
                                   workers=p.data.prepare_workers, progress=not args.no_progress)
    write_split(args.out, split, index)
    n_usable = sum(e["usable"] for e in index["train"])
    print(f"split {p.data.dataset}/{p.data.split}: {len(split['base'])} base, {len(split['novel'])} novel classes; "
          f"{n_usable}/{len(index['train'])} usable training images, {len(index['test'])} test images")


if __name__ == "__main__":
    run(main)
