"""Evaluation: how questions become prompts and replies become scores (MLLMU-Bench's and CLEAR's
measures), membership inference, the relearning attack's split, and intervals over people and seeds."""
