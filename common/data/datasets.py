"""The registry of datasets: adding one is one entry here.

Each entry names its metadata reader as a "module:function" string, resolved only when a table is
read, so that this module (and with it every job's parser and --help) imports neither pandas nor
pydicom. common/data/image_table.py reads, locates and splits through it; common/data/table_flags.py takes
the --dataset choices and help from it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from common.data.labels import CHEXPERT_LABELS, NIH_LABELS

_LABEL_LAYOUT = ("label-columns", "findings-column", "findings-separator", "label-names", "no-finding", "blank-label")
_TABLE_COLUMNS = ("path-column", "patient-column", "image-id-column", "view-column", "age-column", "sex-column")


@dataclass(frozen=True)
class Dataset:
    name: str
    full_name: str
    source: str  # where the archive comes from
    licence: str
    label_meaning: str  # one line on what a label value means
    reader: str  # "module:function": (first argument, **options) -> common.data.tables.Metadata
    reads: str  # the reader's first argument: "metadata" (the --metadata file) or "images" (the root itself)
    options: tuple[str, ...]  # the keyword options of build_image_table the reader takes
    locate_by: str  # common.data.locate rule: "name", "relpath", or "found" (the reader walked the files itself)
    label_names: tuple[str, ...] | None  # None: named by the user's flags (table, dicom)
    metadata_help: str  # what --metadata is for this dataset
    locate_key: str = "image_id"  # the canonical column matched to the files ("file": the table's own path column)
    flags: tuple[str, ...] = ()  # the dataset-specific flags it reads (common/data/table_flags.py); others are refused

    def read(self, first, **options):
        module, function = self.reader.split(":")
        return getattr(importlib.import_module(module), function)(first, **{k: options[k] for k in self.options})


DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset(
        name="nih", full_name="NIH ChestX-ray14 (Wang et al. 2017)",
        source="NIH Clinical Center, https://nihcc.app.box.com/v/ChestXray-NIHCC (also on Kaggle)",
        licence="CC0 1.0; cite Wang et al. 2017 and acknowledge the NIH Clinical Center",
        label_meaning="14 findings text-mined from the reports: 1 mentioned, 0 not ('No Finding' = all 0)",
        reader="common.data.nih:read_nih", reads="metadata", options=(), locate_by="name",
        label_names=NIH_LABELS, metadata_help="Data_Entry_2017*.csv"),
    Dataset(
        name="chexpert", full_name="CheXpert (Irvin et al. 2019), v1.0 and v1.0-small",
        source="Stanford AIMI, https://stanfordmlgroup.github.io/competitions/chexpert/",
        licence="Stanford University Dataset Research Use Agreement (non-commercial research)",
        label_meaning="14 observations from the CheXpert labeler: 1 positive, 0 negative, -1 uncertain, blank = 0",
        reader="common.data.chexpert:read_chexpert", reads="metadata", options=("frontal_only",), locate_by="relpath",
        label_names=CHEXPERT_LABELS, metadata_help="train.csv/valid.csv", flags=("keep-laterals",)),
    Dataset(
        name="table", full_name="any labelled image table (CSV or Parquet)",
        source="a local collection: columns named by --path-column ... or --table-mapping FILE.toml",
        licence="the collection's own",
        label_meaning="as the table gives them: 1 positive, 0 negative, -1 uncertain; blank per --blank-label",
        reader="common.data.table_kind:read_table", reads="metadata", options=("mapping",), locate_by="relpath",
        label_names=None, metadata_help="the table (.csv or .parquet)", locate_key="file",
        flags=("table-mapping", *_TABLE_COLUMNS, *_LABEL_LAYOUT)),
    Dataset(
        name="dicom", full_name="a folder of DICOM files, described by their own headers",
        source="a local PACS export or archive (*.dcm below --images)",
        licence="the archive's own; only the store's columns are read from the headers, no other tag is kept",
        label_meaning="from --label-table keyed by SOPInstanceUID or file name, as the table kind; none without it",
        reader="common.data.dicom_kind:read_dicom", reads="images", options=("mapping", "label_table", "workers", "log"),
        locate_by="found", label_names=None, metadata_help="not used (the headers are the metadata)",
        flags=("label-table", "label-key", "header-workers", *_LABEL_LAYOUT)),
)}


def get_dataset(name: str) -> Dataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"--dataset {name!r}: choose {', '.join(DATASETS)}") from None
