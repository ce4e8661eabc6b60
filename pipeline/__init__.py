"""Two-stage offline unlearning for multimodal LLMs: the library the stages (stages/) compose.

Folders by concern, imports one way (lower rows never import higher ones; tests/test_architecture.py
holds the table of which folder may import which):

    mini_world/   the embedded fictitious world and its tiny fine-tuned LLaVA
    reporting/    the papers' tables, claims and figures from evaluated runs (reads files only)
    evaluation/   protocols, questions, metrics, membership inference, relearning, bootstrap
    training/     the train recipe's pieces: processes, streams, loss inputs, LoRA, checkpoints
    unlearning/   losses, methods, teachers, perturbations and the teacher forward pass
    benchmarks/   one module per data layout (MLLMU-Bench, CLEAR, local files): splits, items, samples
    models/       every model family behind one interface
    (files)       config schema, experiments, hashing, journal, registry, samples, runtime
"""
