"""Unlearning: the losses (one function per equation), methods (a loss with its arguments), teachers
(what the frozen model is shown), the perturbations they use, and the teacher forward pass."""
