"""Evaluation: how questions become prompts (protocols, few_shot, questions), replies (answering, with
generation_journal for resuming and sharding) and scores (scoring, metrics: MLLMU-Bench's and CLEAR's
measures); membership inference, the relearning attack's split, intervals over people and seeds
(bootstrap), one answer token by token (token_probabilities), the run's files (outputs) and one loaded
model shared by several runs (shared_base)."""
