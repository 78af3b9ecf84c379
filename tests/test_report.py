"""Report text that a reader sees: grouped notes and the loss as run."""

from common.training.losses import loss_text as _loss_text
from common.evaluation.report import group_notes

LABELS = ["Edema", "Hernia", "Mass"]


def test_near_equal_notes_become_one_line_per_kind():
    notes = [
        "thresholds: Edema: no positives to choose a threshold on; 0.5 used",
        "thresholds: Hernia: no positives to choose a threshold on; 0.5 used",
        "val: Edema: no positives, AUROC is NaN",
        "val: Hernia: no positives, AUROC is NaN",
        "val: Edema: no positives, D-AUC is NaN",
        "val: Hernia: no positives, D-AUC is NaN",
        "val: Mass: no negatives, AUROC is NaN",
        "test: Edema: no positives, AUROC is NaN",
        "val: 3 unreadable images left out of the metrics",
    ]
    assert group_notes(notes, LABELS) == [
        "thresholds: Edema, Hernia: no positives to choose a threshold on; 0.5 used",
        "val: Edema, Hernia: no positives, AUROC, D-AUC undefined",
        "val: Mass: no negatives, AUROC undefined",
        "test: Edema: no positives, AUROC undefined",
        "val: 3 unreadable images left out of the metrics",
    ]


def test_focal_settings_are_shown_with_the_loss():
    assert _loss_text({"loss": "bce", "focal_gamma": 2.0, "focal_alpha": None}) == "bce"
    assert _loss_text({"loss": "bce+focal", "focal_gamma": 1.5, "focal_alpha": 0.25}) == "bce+focal (focal γ 1.5, α 0.25)"
    assert _loss_text({"loss": "focal", "focal_gamma": 2.0, "focal_alpha": None}) == "focal (focal γ 2, α none)"
