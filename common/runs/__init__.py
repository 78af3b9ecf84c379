"""Run directories, their locks and one-line exits: where a command writes and how it stops."""
