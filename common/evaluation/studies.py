"""Study grouping for study-level scores: which images of a dataset were taken in one study."""

from __future__ import annotations

import re

import numpy as np

_CHEXPERT_STUDY = re.compile(r"patient\d+/study\d+")


def study_ids(dataset: str, image_ids) -> np.ndarray | None:
    """Each image's study where the dataset has studies (CheXpert: patientNNNNN/studyN/, the image's
    folder), for study-level scores; None for datasets without (NIH: one image per visit)."""
    if dataset != "chexpert":
        return None
    found = [_CHEXPERT_STUDY.search(str(i)) for i in image_ids]
    if not all(found):
        return None  # ids not laid out as CheXpert's patient/study folders: no study to group by
    return np.asarray([m.group(0) for m in found], dtype=object)
