"""Teachers served by an inference engine (vLLM, SGLang) over the OpenAI-compatible API: their top-k
log-probabilities for caching, online KD and on-policy grading, and a LoRA student's on-policy
samples (docs/serving.md)."""

from kdtune.serving.client import ServerClient, ServerError
from kdtune.serving.dataset import ServedTeacherDataset
from kdtune.serving.sampler import ServedSampler
from kdtune.serving.teacher import ServedTeacher
from kdtune.serving.temperature import tail_bounds, temper_topk

__all__ = ["ServedSampler", "ServedTeacher", "ServedTeacherDataset", "ServerClient", "ServerError", "tail_bounds", "temper_topk"]
