"""Published per-class AUROCs that a run's report puts beside its own.

They come from the papers' own splits (CheXNet used a random patient-level 70/10/20 split, not
the official NIH test list; CheXpert's are validation-set numbers), so they are a reference
point, not a like-for-like comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Baseline:
    key: str
    title: str  # short column header
    dataset: str  # the store `dataset` these labels belong to
    source: str
    auroc: dict[str, float]
    note: dict[str, str] = field(default_factory=dict)  # per-label detail, e.g. the policy


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

CHEXPERT_2019 = Baseline(
    "chexpert2019",
    "CheXpert paper",
    "chexpert",
    "Irvin et al., CheXpert: a large chest radiograph dataset with uncertainty labels and expert comparison, "
    "AAAI 2019 (arXiv:1901.07031), validation AUROC, best uncertainty policy per label",
    {"Atelectasis": 0.858, "Cardiomegaly": 0.832, "Consolidation": 0.899, "Edema": 0.941, "Pleural Effusion": 0.934},
    {
        "Atelectasis": "U-Ones", "Cardiomegaly": "U-MultiClass", "Consolidation": "U-SelfTrained",
        "Edema": "U-Ones", "Pleural Effusion": "U-MultiClass",
    },
)

ALL = (WANG_2017, CHEXNET, CHEXPERT_2019)


def for_dataset(dataset: str) -> list[Baseline]:
    """The baselines whose labels are this dataset's (NIH numbers beside a CheXpert run would mislead)."""
    return [b for b in ALL if b.dataset == dataset]
