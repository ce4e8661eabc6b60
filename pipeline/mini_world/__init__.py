"""The embedded mini world: a small, deterministic, MLLMU-Bench-shaped data set of fictitious people, the
tiny LLaVA that is fine-tuned until it has memorized them, and that fine-tune.

One file per concept: `config` (sizes, architecture, fine-tune settings), `people` (the data model and
vocabularies), `text` (answer templates and questions), `drawing` (portraits and reference pools),
`hub_files` (MLLMU-Bench's row schemas and Parquet files), `world` (building and writing it all, the data
card), `tiny_model` (tokenizer and architecture) and `fine_tune`. Import from the module itself: this
package file imports nothing, so that reading the settings does not build anything.
"""
