"""One module per pipeline stage: prepare, precompute, train, evaluate, report."""
