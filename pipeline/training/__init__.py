"""The training stage's infrastructure: processes, data streams, the frozen reference, LoRA,
checkpoints and the step log. stages/train.py composes them into the recipe."""
