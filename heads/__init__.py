"""Light heads on feature stores: data, models, the fit loop, runs and their commands (train, predict, evaluate, ensemble, report, compare)."""
