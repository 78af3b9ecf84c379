"""The names flags choose from, kept apart from the code that acts on them.

Nothing heavy is imported here, so a command's parser (and its --help) builds without torch or
pyarrow; common.models.inference and common.features.store take these names from here.
"""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # of the frozen extractor and the fine-tune loop
SPLITS = ("train", "val", "test")  # a feature store's splits (docs/feature-store.md)
CALIBRATION_METHODS = ("none", "temperature")  # --calibrate of heads.train and the fine-tune job

# The backbones the literature architectures (common/models/architectures.py) read feature maps from, by the
# torchvision layout each shares.
ARCHITECTURE_LAYOUTS = {"resnet50": "resnet50", "densenet121": "densenet121", "xrv-resnet50": "resnet50",
                        "xrv-densenet121": "densenet121"}
