"""Benchmark at real scale: the pipeline's own code paths with each shipped experiment's settings, on
random models of the real shapes (LLaVA-1.5-7B, Qwen2.5-VL-3B; pipeline.models.known_configs), built
from configs without downloads, on a small mini world written in MLLMU-Bench's layout.

    python -m bench.real_scale --device cuda   # one GPU: bench/results/real_scale.json
    python -m bench.real_scale --tiny          # the same sections, shrunk, on a CPU (the CI test)

Sections, each written to the JSON as it finishes (a killed run keeps them; one that fails records its
error and the run goes on):
  all_reduce                the training loop's per-step totals all-reduced in the process group that
                            start_processes creates for the device (NCCL on a GPU), one rank
  precompute/<teacher>/b<B> stages.precompute.run of ViKeR (k 5) and Vgid at batch 4 and 16 with the
                            experiments' top-p, support cap, tail cost and student pass; no autocast
  train/<experiment>/<m>    stages.train.run (its LossStep) of every method of llava-mllmu-10-viker and
                            llava-mllmu-5-vgid, a few steps, without and with gradient checkpointing
  generation/b<B>/<merged>  evaluation's generation at batch 16 and 64 with the LoRA unmerged and merged
  official_cloze_exemplars  a batch of official cloze prompts with their exemplar profiles' images
  likelihood_mc             multiple choice scored by the options' likelihood
  overlong_prompt           a prompt past the context: what the pipeline does with it
  qwen/...                  Qwen2.5-VL-3B precompute, and generation with a 3000 x 2000 photo in the batch

The calls into the pipeline are all in pipeline_calls.py. Imports nothing of nltk, rouge-score, datasets,
zstandard or dvc (the GPU machine has none of them; tests/test_real_scale_bench.py checks).
"""
