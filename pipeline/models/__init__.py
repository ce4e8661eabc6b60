"""The model adapter layer: every stage talks to a vision-language model only through this package.

One file per concept: `family` (what differs between architectures), one file per family (`llava`,
`qwen2_vl`), `loading` (model, processor, fingerprints), `batching` (teacher-forced batches and answer
logits), `encoded_samples` and `vision_features` (training's two input caches), `generation`.
"""

from pipeline.models.batching import (
    TeacherForcingBatch,
    TokenizationError,
    answer_logits,
    answer_outputs,
    answer_token_ids,
    answer_token_log_probs,
    check_joint_tokenization,
    check_lengths,
    encode_answers,
    prompt_token_counts,
    prompted,
)
from pipeline.models.encoded_samples import EncodedSamples
from pipeline.models.family import FAMILIES, ModelFamily, PromptedSample
from pipeline.models.generation import generate
from pipeline.models.llava import LlavaFamily
from pipeline.models.loading import (
    DTYPES,
    LoadedModel,
    decoder_layers,
    load_model,
    model_fingerprint,
    resolve_model_dir,
    tokenizer_fingerprint,
)
from pipeline.models.qwen2_vl import Qwen2VLFamily, Qwen25VLFamily
from pipeline.models.shared_prefix import continuation_log_probs
from pipeline.models.vision_features import VisionFeatureCache

__all__ = [
    "DTYPES",
    "decoder_layers",
    "FAMILIES",
    "EncodedSamples",
    "LlavaFamily",
    "LoadedModel",
    "ModelFamily",
    "PromptedSample",
    "Qwen25VLFamily",
    "Qwen2VLFamily",
    "TeacherForcingBatch",
    "VisionFeatureCache",
    "answer_logits",
    "answer_outputs",
    "answer_token_log_probs",
    "TokenizationError",
    "answer_token_ids",
    "check_joint_tokenization",
    "check_lengths",
    "continuation_log_probs",
    "encode_answers",
    "prompt_token_counts",
    "prompted",
    "generate",
    "load_model",
    "model_fingerprint",
    "resolve_model_dir",
    "tokenizer_fingerprint",
]
