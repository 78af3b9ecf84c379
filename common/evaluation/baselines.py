"""Published per-class AUROCs that a run's report puts beside its own.

They come from the papers' own splits (CheXNet used a random patient-level 70/10/20 split, not
the official NIH test list; CheXpert's are validation-set numbers), so they are a reference
point, not a like-for-like comparison.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Baseline:
    key: str
    title: str  # short column header
    dataset: str  # the store `dataset` these labels belong to
    source: str
    auroc: dict[str, float]


WANG_2017 = Baseline(
    "wang2017",
    "Wang 2017",
    "nih",
    "Wang et al., ChestX-ray8: hospital-scale chest X-ray database and benchmarks, CVPR 2017 "
    "(arXiv:1705.02315, 14-label revision), ResNet-50",
    {
        "Atelectasis": 0.700, "Cardiomegaly": 0.810, "Effusion": 0.759, "Infiltration": 0.661,
        "Mass": 0.693, "Nodule": 0.669, "Pneumonia": 0.658, "Pneumothorax": 0.799,
        "Consolidation": 0.703, "Edema": 0.805, "Emphysema": 0.833, "Fibrosis": 0.786,
        "Pleural_Thickening": 0.684, "Hernia": 0.872,
    },
)

CHEXNET = Baseline(
    "chexnet",
    "CheXNet",
    "nih",
    "Rajpurkar et al., CheXNet: radiologist-level pneumonia detection on chest X-rays with deep learning, "
    "arXiv:1711.05225 (2017), DenseNet-121, test AUROC",
    {
        "Atelectasis": 0.8094, "Cardiomegaly": 0.9248, "Effusion": 0.8638, "Infiltration": 0.7345,
        "Mass": 0.8676, "Nodule": 0.7802, "Pneumonia": 0.7680, "Pneumothorax": 0.8887,
        "Consolidation": 0.7901, "Edema": 0.8878, "Emphysema": 0.9371, "Fibrosis": 0.8047,
        "Pleural_Thickening": 0.8062, "Hernia": 0.9164,
    },
)

# Irvin et al. 2019, Table 2 (validation AUROC of each uncertainty approach): one row per policy, so
# a run is shown beside the row of the policy it was trained with, not the best of five.
_CHEXPERT_TABLE = {
    "ignore": ("U-Ignore", (0.818, 0.828, 0.938, 0.934, 0.928)),
    "zeros": ("U-Zeros", (0.811, 0.840, 0.932, 0.929, 0.931)),
    "ones": ("U-Ones", (0.858, 0.832, 0.899, 0.941, 0.934)),
    "selftrained": ("U-SelfTrained", (0.833, 0.831, 0.939, 0.935, 0.932)),
    "multiclass": ("U-MultiClass", (0.821, 0.854, 0.937, 0.928, 0.936)),
}
_CHEXPERT_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
CHEXPERT_2019 = {
    policy: Baseline(
        f"chexpert2019-{policy}",
        f"CheXpert paper {name}",
        "chexpert",
        "Irvin et al., CheXpert: a large chest radiograph dataset with uncertainty labels and expert comparison, "
        f"AAAI 2019 (arXiv:1901.07031), DenseNet-121, validation AUROC, {name}",
        dict(zip(_CHEXPERT_LABELS, values)),
    )
    for policy, (name, values) in _CHEXPERT_TABLE.items()
}

NIH_BASELINES = (WANG_2017, CHEXNET)


def for_dataset(dataset: str, policy: str | None = None) -> list[Baseline]:
    """The baselines of this dataset's labels (NIH numbers beside a CheXpert run would mislead);
    for CheXpert, the paper's row of the run's own uncertain-label policy."""
    if dataset == "nih":
        return list(NIH_BASELINES)
    if dataset == "chexpert" and policy in CHEXPERT_2019:
        return [CHEXPERT_2019[policy]]
    return []
