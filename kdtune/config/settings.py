"""What each recipe's settings accept: the top-level keys of its config (and of its ``generation`` and
``validation`` nodes), with their types, ranges and defaults, checked before anything heavy happens.

A recipe names its settings class in ``@kdtune.config.parse(DistillationSettings)``, which reads
and checks them into a frozen dataclass before ``main(cfg, s)`` runs; ``kdtune validate`` runs the
same checks for the config's recipe (its first line names it, or ``--recipe``). A key the recipe
does not read is an error naming the nearest key it does, so a typo is never silently ignored. A
copied recipe that reads a key of its own subclasses its settings class and names the subclass::

    @dataclass(frozen=True, kw_only=True)
    class Settings(DistillationSettings):
        kd_warmup_steps: int = setting(0, integer(0), "kd_ratio rises from 0 to kd_ratio over this many steps")

Component nodes (``optimizer``, ``dataset`` ...) are only checked to be nodes here; their arguments
are checked when they are built (`instantiate`), the ``model`` and ``teacher`` options by the loaders.
"""

import difflib
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdtune.config.checks import (  # noqa: F401  (a copied recipe's settings import them from here)
    DTYPES, Check, _described, _got, boolean, choice, device, integer, names, node, number, text,
)
from kdtune.errors import KDTuneError
from kdtune.losses import DEFAULT_CHUNK_SIZE, FORMS


def setting(default: Any = MISSING, check: Check | None = None, help: str = ""):
    """A settings field: its default (none: required), the check its value must pass, what it means."""
    return field(default=default, metadata={"check": check, "help": help})


def nested(cls, *, optional: bool = False) -> Check:
    """A node whose keys are the fields of the settings class ``cls``."""

    def check(key, value):
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            raise KDTuneError(f"{key}: expected a mapping of {', '.join(f.name for f in fields(cls))}, "
                              f"got {_got(value)}")
        return _read(value, cls, f"{key}.")

    check.settings = cls  # its fields are walked like the top level's
    return _described(check, "a mapping" + (" or null" if optional else ""))


def _read(plain: dict, cls, prefix: str = ""):
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(plain) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
        raise KDTuneError(f"{prefix}{unknown[0]}: not a setting this recipe reads{hint}")
    values = {}
    for f in fields(cls):
        key = prefix + f.name
        if f.name in plain:
            check = f.metadata.get("check")
            values[f.name] = check(key, plain[f.name]) if check else plain[f.name]
        elif f.default is MISSING:
            raise KDTuneError(f"{key}: required ({f.metadata.get('help') or 'no default'})")
    settings = cls(**values)
    if hasattr(settings, "check_components"):
        settings.check_components(plain)
    return settings


def read_settings(cfg: DictConfig | dict, cls):
    """``cfg``'s top-level settings as an instance of ``cls``, every value checked."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    except OmegaConfBaseException as e:
        raise KDTuneError(f"config: {' '.join(str(e).split())}") from None
    return _read(plain, cls)


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """How on-policy completions are sampled (not the loss temperature)."""

    max_new_tokens: int = setting(check=integer(1), help="the longest completion a step trains on")
    temperature: float = setting(1.0, number(0), "sampling temperature; 0 is greedy")
    top_k: int | None = setting(None, integer(1, optional=True), "sample among the k likeliest tokens; null: all")
    top_p: float | None = setting(1.0, number(0, 1, above=True, optional=True), "nucleus sampling mass")


@dataclass(frozen=True, kw_only=True)
class ValidationSettings:
    """Held-out losses every ``every_n_steps`` optimizer steps, logged as ``val_*`` metrics."""

    dataset: dict = setting(check=node(component=True), help="a dataset component, built with the run's tokenizer")
    every_n_steps: int = setting(check=integer(1), help="validate after every this many optimizer steps")
    max_batches: int | None = setting(None, integer(1, optional=True), "at most this many batches per process")
    batch_size: int | None = setting(None, integer(1, optional=True), "per process; null: the training batch_size")


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """A model served by vLLM (or SGLang) over the OpenAI-compatible API."""

    base_url: str = setting(check=text(), help="the API root, e.g. http://127.0.0.1:8000/v1")
    model: str = setting(check=text(), help="the served model's name (vllm serve --served-model-name)")
    max_concurrency: int = setting(8, integer(1), "requests in flight at once")
    timeout_s: float = setting(120.0, number(0, above=True), "seconds a request may take")
    retries: int = setting(3, integer(0), "more tries after a connection error, timeout or 5xx, with backoff")


@dataclass(frozen=True, kw_only=True)
class TeacherServerSettings(ServerSettings):
    """A served teacher, in place of its checkpoint."""

    top_k: int = setting(20, integer(1), "log-probabilities per token (vLLM allows 20 unless --max-logprobs)")


@dataclass(frozen=True, kw_only=True)
class StudentServerSettings(ServerSettings):
    """vLLM serving the LoRA student's base model (--enable-lora): it samples the on-policy completions."""

    sync_every_n_steps: int = setting(1, integer(1), "push the trained adapter to the server this often")


@dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    """Every training recipe's settings; supervised fine-tuning (full or LoRA) reads exactly these."""

    output_dir: str = setting(check=text(), help="where checkpoints, metrics.jsonl and config.yaml go")
    checkpointer: dict = setting(check=node(component=True), help="the student's checkpoint (hf_checkpointer)")
    tokenizer: dict = setting(check=node(component=True), help="the tokenizer component")
    dataset: dict = setting(check=node(component=True), help="the training data component")
    model: dict | None = setting(None, node(optional=True), "LoRA and activation-checkpointing options")
    optimizer: dict = setting(check=node(component=True), help="an optimizer component (adamw, ...)")
    lr_scheduler: dict = setting(check=node(component=True), help="a schedule component (cosine_with_warmup)")
    metric_logger: dict | None = setting(None, node(component=True, optional=True), "null: metrics.jsonl")
    validation: ValidationSettings | None = setting(None, nested(ValidationSettings, optional=True),
                                                    "held-out losses during training; null: none")
    seed: int | None = setting(None, integer(0, optional=True), "seeds data order, init and sampling; null: drawn")
    shuffle: bool = setting(True, boolean(), "shuffle the training data each epoch")
    batch_size: int = setting(check=integer(1), help="samples per micro-batch, per process")
    gradient_accumulation_steps: int = setting(1, integer(1), "micro-batches per optimizer step")
    epochs: int = setting(check=integer(1), help="passes over the training data")
    max_steps_per_epoch: int | None = setting(None, integer(1, optional=True), "cut each epoch short; null: whole")
    save_every_n_steps: int | None = setting(None, integer(1, optional=True), "checkpoint cadence; null: per epoch")
    resume_from_checkpoint: bool = setting(False, boolean(), "continue from output_dir's newest checkpoint")
    resume_allow_changes: tuple = setting((), names(), "what may differ on resume though it defines the run")
    save_on_interrupt: bool = setting(False, boolean(), "on SIGINT/SIGTERM, checkpoint the step before stopping")
    clip_grad_norm: float | None = setting(None, number(0, above=True, optional=True), "max gradient norm; null: off")
    loss_form: str = setting("fused", choice(*FORMS), "fused never materializes the logits; chunked/full agree")
    loss_chunk_size: int = setting(DEFAULT_CHUNK_SIZE, integer(1), "tokens per chunk of the fused loss")
    device: str | None = setting(None, device(), "cpu, cuda, cuda:N or auto")
    dtype: str = setting("fp32", choice(*DTYPES), "the weights' dtype (the loss math is float32)")
    autocast: str | None = setting(None, choice("bf16", "fp16", optional=True),
                                   "matmuls in this dtype, weights and optimizer state in dtype; null: off")
    compile: bool = setting(False, boolean(), "torch.compile each decoder layer")
    compile_loss: bool = setting(False, boolean(), "torch.compile the fused loss's block math (CE, forward KL)")
    log_every_n_steps: int = setting(1, integer(1), "metrics cadence in optimizer steps")

    def check_components(self, plain: dict) -> None:
        """Build the optimizer and the schedule over a stand-in parameter (and a distillation's loss),
        so that an argument they refuse (a negative learning rate ...) is an error before any weight loads."""
        import torch

        from kdtune.config.instantiate import instantiate
        from kdtune.training.models import check_lora_options

        check_lora_options(plain.get("model"))
        for key in ("lr", "weight_decay", "eps"):
            if key in plain["optimizer"]:
                number(0)(f"optimizer.{key}", plain["optimizer"][key])
        optimizer = instantiate(plain["optimizer"], [torch.nn.Parameter(torch.zeros(1))], _where="optimizer")
        instantiate(plain["lr_scheduler"], optimizer, num_training_steps=1, _where="lr_scheduler")
        if "kd_loss" in plain:
            from kdtune.training.distillation import build_cross_tokenizer_loss, build_divergence

            if plain.get("teacher_tokenizer") is None:
                build_divergence(plain["kd_loss"])
            else:
                build_cross_tokenizer_loss(plain["kd_loss"])


@dataclass(frozen=True, kw_only=True)
class DistillationSettings(TrainingSettings):
    """Knowledge distillation: a frozen teacher (or its cached top-k) guides the student."""

    teacher_checkpointer: dict | None = setting(None, node(component=True, optional=True),
                                                "the teacher's checkpoint; null with teacher_logits_cache")
    teacher: dict | None = setting(None, node(optional=True), "teacher options: dtype, quantize (nf4 | int8)")
    teacher_logits_cache: str | None = setting(None, text(optional=True),
                                               "a cache_teacher_logits folder in place of the teacher")
    teacher_server: TeacherServerSettings | None = setting(None, nested(TeacherServerSettings, optional=True),
                                                           "a served teacher (vLLM) in place of teacher_checkpointer")
    teacher_vocab_check: str = setting("tokenizer", choice("tokenizer", "padding"),
                                       "tokenizer: embedding tables of other sizes need both tokenizers to compare; "
                                       "padding: trust that the extra rows are padding")
    kd_ratio: float = setting(0.5, number(0, 1), "loss = (1 - kd_ratio) * CE + kd_ratio * KD")
    teacher_tokenizer: str | None = setting(None, text(optional=True),
                                            "the teacher's tokenizer folder when it differs from the student's "
                                            "(then kd_loss: uld or hybrid_uld); null: the same tokenizer")
    kd_loss: dict = setting(check=node(component=True), help="the divergence (forward_kl, jsd, ...)")
    hidden_state_loss: dict | None = setting(None, node(component=True, optional=True),
                                             "intermediate-layer loss (cosine, mse, normalized_mse); null: none")


@dataclass(frozen=True, kw_only=True)
class OnPolicySettings(DistillationSettings):
    """On-policy distillation (GKD): the student writes some of the completions it learns on."""

    lmbda: float = setting(0.5, number(0, 1), "probability that a step's completions are the student's own")
    lmbda_end: float | None = setting(None, number(0, 1, optional=True),
                                      "lmbda moves linearly from lmbda to this by the last step; null: constant")
    on_policy_loss: str = setting("divergence", choice("divergence", "sampled_reverse_kl"),
                                  "on the student's own completions: kd_loss over the whole vocabulary, or the "
                                  "sampled-token reverse KL (a policy gradient; the teacher scores sampled tokens)")
    seq_kd: bool = setting(False, boolean(), "off-policy steps train on teacher-written completions")
    generation: GenerationSettings = setting(check=nested(GenerationSettings), help="how completions are sampled")
    student_server: StudentServerSettings | None = setting(None, nested(StudentServerSettings, optional=True),
                                                           "a LoRA student's completions sampled by vLLM; null: "
                                                           "kdtune's own sampler")
    kd_ratio: float = setting(1.0, number(0, 1), "< 1 mixes CE in on the dataset's replies, never on generated ones")


@dataclass(frozen=True, kw_only=True)
class CacheSettings:
    """Caching the teacher's top-k log-probabilities over a dataset (cache_teacher_logits)."""

    output_dir: str = setting(check=text(), help="the cache folder (index.json and safetensors shards)")
    teacher_checkpointer: dict | None = setting(None, node(component=True, optional=True),
                                                "the teacher's checkpoint; null with teacher_server")
    teacher_server: TeacherServerSettings | None = setting(None, nested(TeacherServerSettings, optional=True),
                                                           "a served teacher (vLLM) in place of teacher_checkpointer")
    teacher: dict | None = setting(None, node(optional=True), "teacher options: dtype, quantize (nf4 | int8)")
    teacher_vocab_check: str = setting("tokenizer", choice("tokenizer", "padding"),
                                       "tokenizer: a teacher whose table is not the tokenizer's size needs its "
                                       "tokenizer.json to compare; padding: trust that the extra rows are padding")
    tokenizer: dict = setting(check=node(component=True), help="the distillation run's tokenizer (the student's)")
    dataset: dict = setting(check=node(component=True), help="the distillation run's dataset, tokenized alike")
    top_k: int = setting(64, integer(1), "log-probabilities kept per token")
    temperature: float = setting(1.0, number(0, above=True), "must equal the distillation's kd_loss.temperature")
    logprob_dtype: str = setting("q8", choice("q8", "fp16", "fp32"),
                                 "q8: about 190 bytes a token at k=64, 8-bit codes; fp16: 320, rounded down; "
                                 "fp32: 448, exact")
    samples_per_shard: int = setting(1024, integer(1), "samples per safetensors shard")
    batch_size: int = setting(check=integer(1), help="samples per teacher forward")
    device: str | None = setting(None, device(), "cpu, cuda, cuda:N or auto")
    dtype: str = setting("bf16", choice(*DTYPES), "the teacher's dtype unless teacher.dtype says otherwise")


@dataclass(frozen=True, kw_only=True)
class GenerateSettings:
    """Sampling completions from a checkpoint (generate)."""

    output_dir: str = setting(check=text(), help="where generations.json (and .jsonl) go")
    checkpoint_dir: str = setting(check=text(), help="the model's HF checkpoint folder")
    adapter_dir: str | None = setting(None, text(optional=True), "a PEFT adapter to apply on checkpoint_dir")
    tokenizer: dict = setting(check=node(component=True), help="the tokenizer component")
    prompt: Any = setting(None, help="a string or a list of them, tokenized as plain text")
    messages: Any = setting(None, help="a chat or a list of chats, rendered by the chat template")
    messages_file: str | None = setting(None, text(optional=True), "a JSON/JSONL file of {messages: [...]} rows")
    batch_size: int | None = setting(None, integer(1, optional=True), "prompts per generation batch; null: all")
    max_new_tokens: int = setting(check=integer(1), help="the longest completion")
    temperature: float = setting(0.0, number(0), "0 is greedy")
    top_k: int | None = setting(None, integer(1, optional=True), "sample among the k likeliest tokens; null: all")
    top_p: float | None = setting(None, number(0, 1, above=True, optional=True), "nucleus sampling mass")
    seed: int | None = setting(0, integer(0, optional=True), "seeds sampling; null: drawn")
    device: str | None = setting(None, device(), "cpu, cuda, cuda:N or auto")
    dtype: str = setting("fp32", choice(*DTYPES), "the weights' dtype")


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """Evaluating a checkpoint with lm-eval (eleuther_eval)."""

    output_dir: str = setting(check=text(), help="where results.json goes")
    checkpoint_dir: str = setting(check=text(), help="the model's HF checkpoint folder")
    adapter_dir: str | None = setting(None, text(optional=True), "a PEFT adapter to apply on checkpoint_dir")
    tokenizer: dict = setting(check=node(component=True), help="the tokenizer component")
    tasks: Any = setting(check=None, help="lm-eval task names (a list or one name)")
    include_path: str | None = setting(None, text(optional=True), "a folder of your own task YAMLs")
    include_default_tasks: bool = setting(True, boolean(), "also offer lm-eval's built-in tasks")
    num_fewshot: int | None = setting(None, integer(0, optional=True), "null: each task's own default")
    limit: float | None = setting(None, number(0, above=True, optional=True),
                                  "at most this many documents per task (a fraction if < 1)")
    apply_chat_template: bool = setting(False, boolean(), "render prompts with the model's chat template")
    fewshot_as_multiturn: bool = setting(False, boolean(), "few-shot examples as chat turns")
    log_samples: bool = setting(False, boolean(), "keep every document's inputs and outputs in results.json")
    bootstrap_iters: int = setting(100000, integer(0), "bootstrap resamples for standard errors; 0: none")
    batch_size: int = setting(check=integer(1), help="requests per forward")
    max_seq_len: int | None = setting(None, integer(1, optional=True), "longest input; null: the model's")
    max_new_tokens: int = setting(256, integer(1), "generate_until tasks that name no max_gen_toks")
    gen_kwargs: dict | None = setting(None, node(optional=True), "overrides every generate_until task's settings")
    device: str | None = setting(None, device(), "cpu, cuda, cuda:N or auto")
    dtype: str = setting("fp32", choice(*DTYPES), "the weights' dtype")
    seed: int | None = setting(0, integer(0, optional=True), "seeds lm-eval and sampling")


@dataclass(frozen=True, kw_only=True)
class PruneSettings:
    """Cutting a smaller model out of a trained one by importance on calibration data (prune)."""

    output_dir: str = setting(check=text(), help="the pruned checkpoint's folder (with prune_report.json)")
    checkpoint_dir: str = setting(check=text(), help="the model to prune (an HF checkpoint folder)")
    tokenizer: dict = setting(check=node(component=True), help="the tokenizer component")
    dataset: dict = setting(check=node(component=True), help="calibration data (any dataset component)")
    num_calibration_samples: int = setting(256, integer(1), "samples the importance is measured on")
    batch_size: int = setting(8, integer(1), "calibration samples per forward")
    num_layers_to_remove: int = setting(0, integer(0), "decoder layers to drop")
    num_layers: int | None = setting(None, integer(1, optional=True), "or: decoder layers to keep")
    layer_importance: str = setting("block_influence", choice("block_influence", "skip_loss"),
                                    "1 - cos(layer input, output), or the loss increase without the layer")
    contiguous: bool = setting(False, boolean(), "drop one block of adjacent layers")
    intermediate_size: int | None = setting(None, integer(1, optional=True), "MLP channels to keep; null: all")
    num_attention_heads: int | None = setting(None, integer(1, optional=True),
                                              "query heads to keep (whole key/value groups); null: all")
    hidden_size: int | None = setting(None, integer(1, optional=True), "hidden channels to keep; null: all")
    max_shard_size: Any = setting("5GB", None, "largest safetensors shard (bytes or '5GB')")
    device: str | None = setting(None, device(), "cpu, cuda, cuda:N or auto")
    dtype: str = setting("fp32", choice(*DTYPES), "the weights' dtype while measuring and in the output")


# The built-in recipes' settings classes, so that `kdtune validate` checks a built-in config without
# importing its recipe (eleuther_eval's needs lm-eval); a test keeps it equal to each recipe's
# ``@kdtune.config.parse(...)``. A copied recipe is imported instead (`kdtune validate --recipe`).
RECIPE_SETTINGS = {
    "full_finetune_single_device": TrainingSettings,
    "lora_finetune_single_device": TrainingSettings,
    "lora_finetune_distributed": TrainingSettings,
    "knowledge_distillation_single_device": DistillationSettings,
    "knowledge_distillation_distributed": DistillationSettings,
    "on_policy_distillation_single_device": OnPolicySettings,
    "on_policy_distillation_distributed": OnPolicySettings,
    "cache_teacher_logits": CacheSettings,
    "generate": GenerateSettings,
    "eleuther_eval": EvalSettings,
    "prune": PruneSettings,
}
