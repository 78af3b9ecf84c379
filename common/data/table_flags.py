"""The flags of common.data.image_table.build_image_table, the same in every job that reads an archive.

Apart from image_table (pandas and the metadata readers) so that a job's parser, and its --help,
builds without them; image_table.table_from_flags turns these flags into the table. The --dataset
choices come from common/data/datasets.py, which imports no reader either.
"""

from __future__ import annotations

import argparse

from common.config import ConfigError, require
from common.data.datasets import DATASETS

# The table kind's column mapping: flag names without the dashes, which are also the keys of a
# --table-mapping file's [table] table; each maps to its common.data.tables.TableMapping field.
MAPPING_KEYS = {
    "path-column": "path", "patient-column": "patient", "image-id-column": "image_id", "view-column": "view",
    "age-column": "age", "sex-column": "sex", "label-columns": "label_columns", "findings-column": "findings",
    "findings-separator": "findings_separator", "label-names": "label_names", "no-finding": "no_finding",
    "blank-label": "blank_label", "label-key": "label_key",
}
_MAPPING_HELP = {
    "path-column": "table: column of image paths, relative to --images or absolute",
    "patient-column": "table: column of patient ids (required: splits are patient-level)",
    "image-id-column": "table: column of unique image ids (default: the path)",
    "view-column": "table: column of view positions (PA, AP, ...)",
    "age-column": "table: column of ages in years",
    "sex-column": "table: column of sex (M/F, male/female, ...; anything else unknown)",
    "label-columns": "table, dicom --label-table: one column per label, comma-separated, in the store's order; "
                     "values 1, 0, -1 (uncertain) or blank",
    "findings-column": "table, dicom --label-table: one column listing each row's findings (NIH style)",
    "findings-separator": "separator of --findings-column (default |)",
    "label-names": "the names --findings-column may hold, comma-separated, in the store's order",
    "no-finding": "the --findings-column token meaning no finding (all 0), e.g. 'No Finding'",
    "blank-label": "what a blank label cell means: 0 negative (default, as CheXpert) or -1 uncertain",
    "label-key": "dicom: --label-table column matched to each file's SOPInstanceUID, relative path or file name "
                 "(default SOPInstanceUID)",
}


def add_table_flags(p: argparse.ArgumentParser, splits: bool = True) -> None:
    """Add the flags to `p` (a parser or an argument group); without `splits`, those of reading a table
    only, for a command that scores every image of it (no --split, lists, ratios or seed)."""
    kinds = "; ".join(f"{d.name}: {d.full_name}" for d in DATASETS.values())
    p.add_argument("--dataset", choices=list(DATASETS), default="nih", help=f"the archive's metadata format ({kinds})")
    p.add_argument("--metadata", help=", ".join(f"{d.metadata_help} ({d.name})" for d in DATASETS.values()))
    p.add_argument("--images", help="folder holding the images, searched recursively")
    if splits:
        _add_split_flags(p)
    p.add_argument("--keep-laterals", action="store_true", help="chexpert: keep lateral views")
    p.add_argument("--limit", type=int, help="use only the first N images (by image_id), for trials")
    p.add_argument("--table-mapping", help="table: TOML file whose [table] table sets the column flags below "
                                           "(keys as the flags, without dashes); flags given override it")
    for key, help_ in _MAPPING_HELP.items():
        p.add_argument(f"--{key}", type=int if key == "blank-label" else None,
                       choices=[0, -1] if key == "blank-label" else None, help=help_)
    p.add_argument("--label-table", help="dicom: CSV/Parquet of labels keyed by --label-key (default: no labels)")
    p.add_argument("--header-workers", type=int, help="dicom: processes reading the headers (default: all cores)")


def _add_split_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", choices=["auto", "official", "ratios"], default="auto",
                   help="auto: official lists when found beside the metadata, else patient-level ratios")
    p.add_argument("--train-val-list", help="official train_val list (default: beside --metadata)")
    p.add_argument("--test-list", help="official test list (default: beside --metadata)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of train_val patients carved out as val")
    p.add_argument("--split-ratios", default="0.7,0.1,0.2", help="train,val,test shares of patients")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
    p.add_argument("--test-metadata", help="a separate table as the test split (e.g. CheXpert's valid.csv); "
                                           "--metadata's patients then go to train and val by --val-fraction")
    p.add_argument("--test-images", help="image folder of --test-metadata (default: --images)")


# The flags only some datasets read (each registry entry's `flags`): one given to another dataset is
# refused, never silently ignored.
DATASET_FLAGS = {name: d.flags for name, d in DATASETS.items() if d.flags}


def check_table_flags(args: argparse.Namespace) -> None:
    """Refuse, before any work, a missing --images/--metadata and a flag the chosen dataset does not read."""
    entry = DATASETS.get(args.dataset)
    require(args, *(("images",) if entry is not None and entry.reads == "images" else ("metadata", "images")))
    own = DATASET_FLAGS.get(args.dataset, ())
    for name in dict.fromkeys(f for flags in DATASET_FLAGS.values() for f in flags):
        if name not in own and getattr(args, name.replace("-", "_"), None) not in (None, False):
            readers = [d for d, flags in DATASET_FLAGS.items() if name in flags]
            raise ConfigError(f"--{name}: not read by --dataset {args.dataset} (only by {' and '.join(readers)})")
    if getattr(args, "header_workers", None) is not None and args.header_workers < 1:
        raise ConfigError(f"--header-workers {args.header_workers}: must be at least 1")
