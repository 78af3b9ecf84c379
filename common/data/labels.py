"""Canonical label names and their fixed order, one list per dataset."""

# Wang et al. 2017 order, used by CheXNet and most ChestX-ray14 papers.
NIH_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NIH_NO_FINDING = "No Finding"

# CheXpert train.csv column order.
CHEXPERT_LABELS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
# The five labels of the CheXpert competition (Irvin et al. 2019).
CHEXPERT_COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

LABELS = {"nih": NIH_LABELS, "chexpert": CHEXPERT_LABELS}

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1


# --- One pathology, one name, across datasets ------------------------------------------------
#
# A head trained on one dataset is scored on another by pairing labels through canonical names,
# as torchxrayvision's relabel_dataset does (its default_pathologies spellings: "Effusion",
# "Pleural_Thickening", "Lung Opacity", "Enlarged Cardiomediastinum", "Lung Lesion", ...). A label
# of the target with no counterpart in the source becomes NaN, "not labelled", never 0: an NIH
# image is not "Fracture-negative" because NIH has no Fracture column.
#
# Only true synonyms share a canonical name. A label that is a broader or narrower finding is NOT
# aliased, since scoring a head's "Mass" against CheXpert's "Lung Lesion" would call every nodule
# a false positive. The non-aliases a user might expect, and why:
#   - CheXpert "Pleural Other" is not NIH "Pleural_Thickening": it also holds pleural plaques,
#     calcification and fibrosis (Irvin et al. 2019), a superset.
#   - CheXpert "Lung Lesion" is neither "Mass" nor "Nodule": it is their union plus cysts, cavities
#     and other focal lesions.
#   - CheXpert "Lung Opacity" is not NIH "Infiltration": opacity is the parent of edema,
#     consolidation, atelectasis, pneumonia and lesions in CheXpert's hierarchy; infiltration is an
#     older, narrower report term.
#   - CheXpert "Enlarged Cardiomediastinum" is not "Cardiomegaly": it is Cardiomegaly's parent and
#     also covers a wide mediastinum.
#   - "No Finding" is spelt alike but means "none of this dataset's own findings": an NIH No Finding
#     image may have a fracture or a device CheXpert would label. It pairs only within one dataset.
# Spelling is not meaning: names are compared ignoring case and "_" vs " " (the table kind's
# user-named labels, PadChest-style "pleural thickening"), then through this table.
CANONICAL = {
    # NIH ChestX-ray14 (Wang et al. 2017): its names are torchxrayvision's canonical ones.
    **{name: name for name in NIH_LABELS},
    # CheXpert (Irvin et al. 2019) and MIMIC-CXR, which uses CheXpert's labeler and names.
    "Pleural Effusion": "Effusion",
    "Enlarged Cardiomediastinum": "Enlarged Cardiomediastinum",
    "Lung Opacity": "Lung Opacity",
    "Lung Lesion": "Lung Lesion",
    "Pleural Other": "Pleural Other",
    "Fracture": "Fracture",
    "Support Devices": "Support Devices",
    "No Finding": "No Finding",
}
WITHIN_DATASET_ONLY = ("No Finding",)  # defined by each dataset's own label set (above)


def _spelling(name: str) -> str:
    return " ".join(str(name).replace("_", " ").split()).casefold()


_BY_SPELLING = {_spelling(k): v for k, v in CANONICAL.items()}


def canonical(name: str) -> str:
    """The pathology's canonical (torchxrayvision) name: "Pleural Effusion" -> "Effusion"; a name
    not in CANONICAL is its own canonical name."""
    return _BY_SPELLING.get(_spelling(name), str(name).strip())


def shared_labels(a_names, b_names, same_dataset: bool = False) -> list[tuple[str, str]]:
    """(a_name, b_name) for each label of `a_names` that `b_names` has under the alias table, in
    a's order. WITHIN_DATASET_ONLY labels pair only when both name lists are of one dataset."""
    by_key = {_spelling(canonical(b)): b for b in b_names}
    pairs = []
    for a in a_names:
        b = by_key.get(_spelling(canonical(a)))
        if b is not None and (same_dataset or canonical(a) not in WITHIN_DATASET_ONLY):
            pairs.append((a, b))
    return pairs


def relabel(labels, from_names, to_names, same_dataset: bool = False):
    """Labels in `from_names` column order -> float (rows, len(to_names)) in `to_names` order:
    1 / 0 / -1 (uncertain) copied through the alias table, NaN where `from_names` lacks the label."""
    import numpy as np

    labels = np.asarray(labels)
    out = np.full((labels.shape[0], len(to_names)), np.nan)
    source = {to: list(from_names).index(frm) for to, frm in shared_labels(to_names, from_names, same_dataset)}
    for j, name in enumerate(to_names):
        if name in source:
            out[:, j] = labels[:, source[name]]
    return out
