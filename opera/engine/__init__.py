"""Training machinery: optimizers, schedules, checkpoints, logging and the pretraining loop."""
