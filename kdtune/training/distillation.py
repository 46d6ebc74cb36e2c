"""What a distillation run sets up before any weight loads: the tokenizer, the student's checkpoint,
the teacher's (their vocabularies must agree with the tokenizer, or the teacher's own tokenizer is
given as ``teacher_tokenizer`` with a cross-tokenizer loss) or a teacher cache in its place, a
served teacher (vLLM) in its place, the divergence, and the hidden-state loss with its layer map
when the config asks for one."""

from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kdtune.checkpointing import HFCheckpointer, check_vocab_compatible
from kdtune.checkpointing.hf_format import read_config, text_config
from kdtune.checkpointing.vocab import check_same_tokens, scored_vocab_size
from kdtune.config import instantiate, resolve_component
from kdtune.errors import KDTuneError
from kdtune.losses import Divergence, HiddenStateLoss
from kdtune.losses.cross_tokenizer import CrossTokenizerLoss
from kdtune.offline.dataset import collate_with_teacher_topk, join_teacher_cache
from kdtune.offline.index import read_index
from kdtune.serving import ServedTeacher, ServedTeacherDataset
from kdtune.serving.dataset import collate_aligned_topk
from kdtune.tokenization import load_tokenizer


@dataclass
class DistillationParts:
    tokenizer: object
    checkpointer: HFCheckpointer
    teacher_checkpointer: HFCheckpointer | None  # None when distilling from a teacher cache or server
    divergence: Divergence
    teacher_cache: str | None = None  # teacher_logits_cache: the cached top-k stand in for the teacher
    hidden_state_loss: HiddenStateLoss | None = None  # with its projections, when the config has one
    teacher_server: ServedTeacher | None = None  # a served teacher's top-k stand in for the teacher, checked
    teacher_tokenizer: object = None  # the teacher's own tokenizer, when it differs from the student's

    @property
    def dataset_args(self) -> dict:
        """What the dataset component takes besides the tokenizer: the teacher's tokenizer, whose
        encoding of each sample is aligned with the student's."""
        return {} if self.teacher_tokenizer is None else {"teacher_tokenizer": self.teacher_tokenizer}

    @property
    def checkpointers(self) -> list[HFCheckpointer]:
        """The student's and (unless distilling from a cache or a server) the teacher's."""
        return [self.checkpointer] + ([self.teacher_checkpointer] if self.teacher_checkpointer else [])


def distillation_parts(cfg: DictConfig) -> DistillationParts:
    """The parts of ``cfg``; with ``teacher_logits_cache`` there is no teacher checkpoint: the
    cache's tokenizer is checked by fingerprint when it is opened. With ``teacher_server`` neither:
    the server is asked here whether it is up, serves the model and shares the tokenizer."""
    cache, server = cfg.get("teacher_logits_cache"), cfg.get("teacher_server")
    if server is not None:
        others = [k for k in ("teacher_checkpointer", "teacher_logits_cache") if cfg.get(k) is not None]
        if others:
            raise KDTuneError(f"teacher_server and {others[0]} are both set: distill from one teacher (remove "
                              f"{others[0]} with ~{others[0]})")
    elif cache and cfg.get("teacher_checkpointer") is not None:
        raise KDTuneError("teacher_logits_cache and teacher_checkpointer are both set: distill from the cache "
                          "(remove teacher_checkpointer with ~teacher_checkpointer) or from the teacher model")
    elif not cache and cfg.get("teacher_checkpointer") is None:
        raise KDTuneError("teacher_checkpointer: required (the teacher's checkpoint), or teacher_logits_cache")
    vocab_check = cfg.get("teacher_vocab_check", "tokenizer")
    if cache:
        check_cache_teacher(Path(cache), vocab_check)
    tokenizer = instantiate(cfg.tokenizer)
    checkpointer = instantiate(cfg.checkpointer)
    teacher_checkpointer = None if cache or server is not None else instantiate(cfg.teacher_checkpointer)
    teacher_tokenizer = cross_tokenizer(cfg, cache, server, teacher_checkpointer)
    if teacher_tokenizer is not None:
        vocab_size = tokenizer.vocab_size
    else:
        try:
            vocab_size = check_vocab_compatible(checkpointer.checkpoint_dir,
                                                (teacher_checkpointer or checkpointer).checkpoint_dir,
                                                tokenizer.vocab_size, tokenizer.marker_ids, vocab_check,
                                                tokenizer_dir=tokenizer.path)
        except KDTuneError as e:
            raise KDTuneError(f"{e}; a teacher with another tokenizer needs teacher_tokenizer (its tokenizer folder) "
                              f"and a cross-tokenizer kd_loss ({', '.join(CROSS_TOKENIZER_LOSSES)})") from None
    hidden = None
    if cfg.get("hidden_state_loss") is not None:
        if cache:
            raise KDTuneError("hidden_state_loss: the teacher cache holds no hidden states; distill from the "
                              "teacher itself (teacher_checkpointer) to match them")
        if server is not None:
            raise KDTuneError("hidden_state_loss: a served teacher gives log-probabilities, not hidden states; "
                              "distill from the teacher itself (teacher_checkpointer) to match them")
        hidden = instantiate(cfg.hidden_state_loss, student=checkpointer.model_args,
                             teacher=teacher_checkpointer.model_args)
    if teacher_tokenizer is not None:
        divergence = build_cross_tokenizer_loss(cfg.kd_loss)
        divergence.setup(tokenizer, teacher_tokenizer, student_softcap=checkpointer.model_args.final_logit_softcapping,
                         teacher_softcap=teacher_checkpointer.model_args.final_logit_softcapping
                         if teacher_checkpointer else None)
    else:
        divergence = build_divergence(cfg.kd_loss, vocab_size=vocab_size)
    served = None if server is None else served_teacher(server, teacher_tokenizer or tokenizer, divergence.temperature)
    return DistillationParts(tokenizer, checkpointer, teacher_checkpointer, divergence, cache or None, hidden, served,
                             teacher_tokenizer)


CROSS_TOKENIZER_LOSSES = ("uld", "hybrid_uld")


def cross_tokenizer(cfg, cache, server, teacher_checkpointer):
    """The teacher's tokenizer when ``teacher_tokenizer`` is set (it is compared with the student's
    by aligning each sample's two encodings), else None; what such a run cannot do is one line."""
    path = cfg.get("teacher_tokenizer")
    name = (cfg.get("kd_loss") or {}).get("_component_")
    component = resolve_component(name, "kd_loss._component_") if name else None
    is_cross = isinstance(component, type) and issubclass(component, CrossTokenizerLoss)
    if path is None:
        return None  # (a cross-tokenizer kd_loss without it is refused by build_divergence)
    if not is_cross:
        raise KDTuneError(f"teacher_tokenizer: with a teacher of another tokenizer kd_loss must be a cross-tokenizer "
                          f"loss ({', '.join(CROSS_TOKENIZER_LOSSES)}), got '{name}'")
    for key, value in (("teacher_logits_cache", cache), ("hidden_state_loss", cfg.get("hidden_state_loss"))):
        if value is not None:
            raise KDTuneError(f"{key}: not supported with teacher_tokenizer yet; distill from the teacher itself "
                              f"(teacher_checkpointer or teacher_server), matching output distributions only")
    temperature = (cfg.get("kd_loss") or {}).get("temperature", 1.0)
    if server is not None and temperature != 1:
        raise KDTuneError(f"kd_loss.temperature: a served teacher of another tokenizer scores a span's later tokens "
                          f"at temperature 1 (vLLM's), so the loss's must be 1 too, got {temperature}")
    if not Path(str(path)).expanduser().is_dir():
        raise KDTuneError(f"teacher_tokenizer: no such folder: {path}")
    teacher_tokenizer = load_tokenizer(Path(str(path)).expanduser())
    if teacher_checkpointer is None:  # a served teacher: the server is checked against this tokenizer
        return teacher_tokenizer
    rows = text_config(read_config(Path(teacher_checkpointer.checkpoint_dir)))["vocab_size"]
    if scored_vocab_size(rows, teacher_tokenizer.vocab_size, teacher_tokenizer.marker_ids) is None:
        raise KDTuneError(f"teacher_tokenizer: {path} has {teacher_tokenizer.vocab_size:,} tokens but the teacher "
                          f"({teacher_checkpointer.checkpoint_dir}) has {rows:,} embedding rows: it is not the teacher's "
                          f"tokenizer")
    try:  # the teacher's folder may ship its tokenizer: then it is this one
        check_same_tokens(teacher_tokenizer.path, teacher_checkpointer.checkpoint_dir, teacher_tokenizer.vocab_size)
    except KDTuneError as e:
        raise KDTuneError(f"teacher_tokenizer: {path} is not the teacher's tokenizer ({e})") from None
    return teacher_tokenizer


def build_cross_tokenizer_loss(node) -> CrossTokenizerLoss:
    """``kd_loss`` built, refused in one line unless it compares aligned spans (`CrossTokenizerLoss`)."""
    name = node.get("_component_")
    component = resolve_component(name, "kd_loss._component_")
    if not (isinstance(component, type) and issubclass(component, CrossTokenizerLoss)):
        raise KDTuneError(f"teacher_tokenizer: with a teacher of another tokenizer kd_loss must be a cross-tokenizer "
                          f"loss ({', '.join(CROSS_TOKENIZER_LOSSES)}), got '{name}'")
    return instantiate(node, _where="kd_loss")


def served_teacher(node, tokenizer, temperature: float) -> ServedTeacher:
    """The ``teacher_server`` node's teacher (a node or its checked settings), checked against
    ``tokenizer``: one line if it is not the teacher to distill from."""
    from kdtune.config.settings import TeacherServerSettings, nested  # settings import this module

    if not is_dataclass(node):
        plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
        node = nested(TeacherServerSettings)("teacher_server", plain)  # checked, defaults filled in
    teacher = ServedTeacher(**asdict(node), temperature=temperature, vocab_size=tokenizer.vocab_size)
    teacher.check(tokenizer)
    return teacher


def join_teacher(dataset, kd: DistillationParts):
    """The dataset and collate function to train on: ``dataset`` joined with the top-k rows of the
    teacher cache or of the served teacher when the run distills from one (batches then carry
    ``teacher_topk``), else ``dataset`` and `collate` as they are."""
    if kd.teacher_server is not None:
        joined = ServedTeacherDataset(dataset, kd.teacher_server)
        return joined, collate_aligned_topk if kd.teacher_tokenizer is not None else collate_with_teacher_topk
    return join_teacher_cache(dataset, kd.teacher_cache, tokenizer=kd.tokenizer, temperature=kd.divergence.temperature)


def check_cache_teacher(cache: Path, vocab_check: str) -> None:
    """A cache whose teacher was trusted (``teacher_vocab_check: padding`` when it was made), not
    checked against the tokenizer, is read only by a run that trusts it too."""
    index = read_index(cache) if cache.is_dir() else None
    teacher = (index or {}).get("teacher") or {}
    if teacher.get("vocab_check") == "padding" and vocab_check != "padding":
        raise KDTuneError(f"teacher_vocab_check: the cache in '{cache}' was made with teacher_vocab_check: padding "
                          f"(its teacher {teacher.get('checkpoint_dir')}, {teacher.get('vocab_size'):,} embedding rows, "
                          f"was trusted, not checked against the tokenizer); set teacher_vocab_check: padding here "
                          f"too, or remake the cache with the teacher's tokenizer files beside its weights")


DIVERGENCE_INTERFACE = ("subclass kdtune.losses.Divergence: pass temperature, ignore_index and vocab_size on to "
                        "its __init__ and define per_token(log_q, log_p) -> [N] (see docs/losses.md, 'Writing a "
                        "divergence')")


def build_divergence(node, **kwargs) -> Divergence:
    """``kd_loss`` built, refused in one line unless it is a `Divergence`: the fused, chunked and top-k
    forms call its ``per_token`` and read its ``temperature``, ``ignore_index`` and ``vocab_size``."""
    name = node.get("_component_")
    component = resolve_component(name, "kd_loss._component_")
    if isinstance(component, type) and issubclass(component, CrossTokenizerLoss):
        raise KDTuneError(f"kd_loss: '{name}' compares a teacher whose tokenizer differs from the student's; set "
                          f"teacher_tokenizer (the teacher's tokenizer folder), or use a divergence (forward_kl, ...)")
    if isinstance(component, type) and not issubclass(component, Divergence):
        raise KDTuneError(f"kd_loss: '{name}' is not a divergence; a kd_loss must {DIVERGENCE_INTERFACE}")
    divergence = instantiate(node, _where="kd_loss", **kwargs)
    if not isinstance(divergence, Divergence):
        raise KDTuneError(f"kd_loss: '{name}' made a {type(divergence).__name__}, not a divergence; a kd_loss must "
                          f"{DIVERGENCE_INTERFACE}")
    return divergence
