"""Distillation losses: cross-entropy and divergences in full, chunked and fused-with-projection forms."""

from kdtune.losses.cross_entropy import CrossEntropyLoss
from kdtune.losses.cross_tokenizer import AlignedTeacher, CrossTokenizerLoss, HybridULDLoss, ULDLoss
from kdtune.losses.divergences import (
    Divergence,
    ForwardKLLoss,
    GeneralizedJSDLoss,
    ReverseKLLoss,
    SkewForwardKLLoss,
    SkewReverseKLLoss,
    TVDLoss,
)
from kdtune.losses.fused import DEFAULT_CHUNK_SIZE, FusedLinearKDLoss
from kdtune.losses.hidden_states import (
    CosineHiddenStateLoss,
    HiddenStateLoss,
    MSEHiddenStateLoss,
    NormalizedMSEHiddenStateLoss,
    uniform_layer_map,
)
from kdtune.losses.linear import FORMS, LinearCrossEntropyLoss, LinearKDLoss
from kdtune.losses.sampled_kl import SampledReverseKLLoss, token_logprobs
from kdtune.losses.sparse import TeacherTopK
from kdtune.losses.token_loss import TokenLoss, count_valid_tokens

__all__ = [
    "AlignedTeacher",
    "CrossTokenizerLoss",
    "HybridULDLoss",
    "ULDLoss",
    "DEFAULT_CHUNK_SIZE",
    "FORMS",
    "CosineHiddenStateLoss",
    "CrossEntropyLoss",
    "Divergence",
    "ForwardKLLoss",
    "FusedLinearKDLoss",
    "GeneralizedJSDLoss",
    "HiddenStateLoss",
    "LinearCrossEntropyLoss",
    "LinearKDLoss",
    "MSEHiddenStateLoss",
    "NormalizedMSEHiddenStateLoss",
    "ReverseKLLoss",
    "SampledReverseKLLoss",
    "SkewForwardKLLoss",
    "SkewReverseKLLoss",
    "TVDLoss",
    "TeacherTopK",
    "TokenLoss",
    "count_valid_tokens",
    "token_logprobs",
    "uniform_layer_map",
]
