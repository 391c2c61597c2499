"""Where each real dataset comes from: official archive name, URL, pinned checksum, contents.

``checksum`` is ``"md5:<hex>"`` / ``"sha256:<hex>"`` when the publisher's digest is known and
empty when none was ever published (COCO-Stuff-10K): such an archive is verified by its zip
CRCs on first use and pinned by a recorded ``<archive>.sha256`` afterwards
(see :mod:`pipeline.data.acquire` and ``docs/DATASETS.md``).

The ``data.url`` / ``data.checksum`` overrides may be scoped per dataset
(``ade20k=md5:<hex>, coco_stuff_10k=sha256:<hex>``): :func:`scoped_override` picks the entry
of the chosen dataset.

``root_markers`` are paths (relative to the dataset root inside the archive) whose presence
identifies the root folder after extraction; ``expected_members`` are every path the
preparation step needs.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSource:
    dataset: str
    archive_name: str
    url: str
    checksum: str                      # "" when no checksum was published
    approx_size: str                   # human-readable, for messages
    root_markers: tuple[str, ...]      # identify the dataset root folder inside the extraction
    expected_members: tuple[str, ...]  # relative to the dataset root ('/' = folder)
    homepage: str = ""


SOURCES: dict[str, DatasetSource] = {
    "ade20k": DatasetSource(
        dataset="ade20k",
        archive_name="ADEChallengeData2016.zip",
        url="http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
        checksum="md5:7328b3957e407ddae1d3cbf487f149ef",
        approx_size="about 923 MB",
        root_markers=("images/training", "annotations/training"),
        expected_members=("images/training/", "images/validation/", "annotations/training/",
                          "annotations/validation/", "objectInfo150.txt"),
        homepage="http://sceneparsing.csail.mit.edu/",
    ),
    "coco_stuff_10k": DatasetSource(
        dataset="coco_stuff_10k",
        archive_name="cocostuff-10k-v1.1.zip",
        url="http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/cocostuff-10k-v1.1.zip",
        checksum="",  # none published: see module docstring
        approx_size="about 2.0 GB",
        root_markers=("imageLists/train.txt", "annotations"),
        expected_members=("images/", "annotations/", "imageLists/train.txt", "imageLists/test.txt"),
        homepage="https://github.com/nightrome/cocostuff10k",
    ),
}

# Source split name inside the archive -> prepared split name.
ADE20K_SPLITS = {"training": "train", "validation": "test"}
COCO_SPLITS = {"train": "train", "test": "test"}


def scoped_override(value: str, dataset: str, key: str = "data.checksum") -> str:
    """The part of a ``data.url`` / ``data.checksum`` override that applies to ``dataset``.

    A value is either unscoped (``md5:<hex>``: it applies to whichever dataset is chosen) or a
    list of ``<dataset>=<value>`` entries separated by commas or whitespace
    (``ade20k=md5:<hex>, coco_stuff_10k=sha256:<hex>``): then only the chosen dataset's entry
    applies and an override written for one archive never rejects another. ``""`` when none
    applies. A list that mixes scoped and unscoped entries, names an unknown dataset or
    names one twice raises :class:`ValueError` naming ``key``.
    """
    value = (value or "").strip()
    known = tuple(SOURCES) + ("synthetic",)

    def dataset_of(entry: str) -> str | None:
        name, sep, _ = entry.partition("=")
        return name if sep and name in known else None

    if not value or dataset_of(value) is None:
        return value  # empty, or unscoped: applies to the chosen dataset
    scoped: dict[str, str] = {}
    for e in value.replace(",", " ").split():
        name = dataset_of(e)
        rest = e.partition("=")[2]
        if name is None or not rest:
            raise ValueError(f"{key} {value!r}: entry {e!r} must read <dataset>=<value>, with a dataset of "
                             f"{', '.join(SOURCES)} (a list cannot mix scoped and unscoped values)")
        if name in scoped:
            raise ValueError(f"{key} {value!r}: dataset {name!r} is given twice")
        scoped[name] = rest
    return scoped.get(dataset, "")


def get_source(dataset: str) -> DatasetSource:
    """The :class:`DatasetSource` of a real dataset; a clear error for anything else."""
    if dataset in SOURCES:
        return SOURCES[dataset]
    if dataset == "synthetic":
        raise ValueError("dataset 'synthetic' is generated locally, it has no archive to download")
    raise ValueError(f"unknown dataset {dataset!r}; real datasets: {', '.join(sorted(SOURCES))}")
