"""Where each real dataset comes from: official archive name, URL, pinned checksum, contents.

``checksum`` is ``"md5:<hex>"`` / ``"sha256:<hex>"`` when the publisher's digest is known and
empty when none was ever published (COCO-Stuff-10K): such an archive is verified by its zip
CRCs on first use and pinned by a recorded ``<archive>.sha256`` afterwards
(see :mod:`pipeline.data.acquire` and ``docs/DATASETS.md``).

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


def get_source(dataset: str) -> DatasetSource:
    """The :class:`DatasetSource` of a real dataset; a clear error for anything else."""
    if dataset in SOURCES:
        return SOURCES[dataset]
    if dataset == "synthetic":
        raise ValueError("dataset 'synthetic' is generated locally, it has no archive to download")
    raise ValueError(f"unknown dataset {dataset!r}; real datasets: {', '.join(sorted(SOURCES))}")
