"""Two-stage offline unlearning for multimodal LLMs: the CLI, configuration and method registries."""
