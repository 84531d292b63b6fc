"""Training: LR schedule, forward/backward schedule, loop, logging, checkpoints, and the pretrain entry."""
