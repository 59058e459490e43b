"""Training on megatron.core primitives: the LM step, (later) data, schedules, checkpoints, logs."""
