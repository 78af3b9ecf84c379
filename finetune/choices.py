"""The names jobs/finetune.py's flags choose from, importable without torch (see common/choices.py);
finetune.config takes them from here."""

SCHEDULES = ("plateau", "step")
BEST_METRICS = ("val_loss", "val_auc")
