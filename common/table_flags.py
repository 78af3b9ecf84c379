"""The flags of common.image_table.build_image_table, the same in every job that reads an archive.

Apart from image_table (pandas and the metadata readers) so that a job's parser, and its --help,
builds without them; image_table.table_from_flags turns these flags into the table.
"""

from __future__ import annotations

import argparse


def add_table_flags(p: argparse.ArgumentParser) -> None:
    """Add the flags to `p` (a parser or an argument group)."""
    p.add_argument("--dataset", choices=["nih", "chexpert"], default="nih", help="the archive's metadata format")
    p.add_argument("--metadata", help="Data_Entry_2017*.csv (nih) or train.csv/valid.csv (chexpert)")
    p.add_argument("--images", help="folder holding the images, searched recursively")
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
    p.add_argument("--keep-laterals", action="store_true", help="chexpert: keep lateral views")
    p.add_argument("--limit", type=int, help="use only the first N images (by image_id), for trials")
