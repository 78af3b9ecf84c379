"""End-to-end fine-tuning on images: settings, data and the decode cache, the (distributed) training loop, checkpoints, localization and the run as a predictor."""
