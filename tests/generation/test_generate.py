"""Greedy generation with and without the KV cache against transformers, stopping, padding, the
training view of the output, and what generate leaves behind in the model."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import kdtune.training.memory as memory
from kdtune.checkpointing import load_model
from kdtune.datasets import IGNORE_INDEX, collate, prompt_completion_sample
from kdtune.errors import KDTuneError
from kdtune.generation import generate
from tests.models.tiny import CONFIGS, make_checkpoint

PAD = 0
# Different lengths, so rows carry 0 to 8 tokens of left padding.
PROMPTS = [[5, 17, 33, 2, 90, 41], [12], [7, 7, 101, 55, 3, 19, 88, 23, 64], [150, 9]]
FAMILIES = ["llama", "llama3_scaled", "qwen2", "qwen3"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("generation")
    return {name: make_checkpoint(name, root / name) for name in FAMILIES}


def truncate_at_stop(ids, stop_ids):
    """The completion up to and including its first stop token."""
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[: i + 1]
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_cache_equals_no_cache_equals_transformers(checkpoints, family):
    transformers = pytest.importorskip("transformers", reason="transformers is the greedy-decoding reference")
    model = load_model(checkpoints[family])
    free = generate(model, PROMPTS, max_new_tokens=12, stop_ids=[], pad_id=PAD)
    no_cache = generate(model, PROMPTS, max_new_tokens=12, stop_ids=[], pad_id=PAD, use_cache=False)
    assert free.completions == no_cache.completions
    stop = free.completions[0][4]  # row 0 stops after 5 tokens; others where (if) they meet it
    expected = [truncate_at_stop(c, {stop}) for c in free.completions]
    for use_cache in (True, False):
        out = generate(model, PROMPTS, max_new_tokens=12, stop_ids=[stop], pad_id=PAD, use_cache=use_cache)
        assert out.completions == expected

    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.float32).eval()
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in PROMPTS])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    for stop_ids, want in (([], free.completions), ([stop], expected)):
        ref = hf.generate(
            ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False,
            eos_token_id=stop_ids or None, pad_token_id=PAD, top_k=None, top_p=None, temperature=None,
        )
        assert [truncate_at_stop(row, set(stop_ids)) for row in ref[:, width:].tolist()] == want


def test_rows_do_not_see_each_other_or_the_padding(checkpoints):
    model = load_model(checkpoints["qwen2"])
    batch = generate(model, PROMPTS, max_new_tokens=8, stop_ids=[], pad_id=PAD).completions
    assert generate(model, PROMPTS, max_new_tokens=8, stop_ids=[], pad_id=99).completions == batch
    alone = [generate(model, [p], max_new_tokens=8, stop_ids=[], pad_id=PAD).completions[0] for p in PROMPTS]
    assert alone == batch


def test_stopping_per_row_and_early_end(checkpoints):
    model = load_model(checkpoints["llama"])
    free = generate(model, PROMPTS, max_new_tokens=10, stop_ids=[], pad_id=PAD).completions
    stops = {free[0][1], free[2][0]}
    out = generate(model, PROMPTS, max_new_tokens=10, stop_ids=stops, pad_id=PAD)
    expected = [truncate_at_stop(c, stops) for c in free]
    assert out.completions == expected
    assert out.completion_lens.tolist() == [len(c) for c in expected]
    assert out.stopped.tolist() == [c[-1] in stops for c in expected]
    assert out.sequences.shape == (len(PROMPTS), out.prompt_width + max(map(len, expected)))
    # every row stopping at once ends generation before max_new_tokens
    everything = set(range(CONFIGS["llama"]["vocab_size"]))
    early = generate(model, PROMPTS, max_new_tokens=10, stop_ids=everything, pad_id=PAD)
    assert early.completions == [c[:1] for c in free] and early.sequences.shape[1] == early.prompt_width + 1


def test_output_layout(checkpoints):
    model = load_model(checkpoints["qwen3"])
    free = generate(model, PROMPTS, max_new_tokens=6, stop_ids=[], pad_id=PAD).completions
    out = generate(model, PROMPTS, max_new_tokens=6, stop_ids={free[1][2]}, pad_id=PAD)
    width = max(map(len, PROMPTS))
    assert out.prompt_width == width and out.prompt_lens.tolist() == list(map(len, PROMPTS))
    for row, prompt, completion in zip(out.sequences.tolist(), PROMPTS, out.completions):
        tail = row[width + len(completion) :]
        assert row == [PAD] * (width - len(prompt)) + prompt + completion + tail and set(tail) <= {PAD}


def test_top_k_1_is_greedy(checkpoints):
    model = load_model(checkpoints["qwen2"])
    greedy = generate(model, PROMPTS, max_new_tokens=8, stop_ids=[], pad_id=PAD).completions
    sampled = generate(model, PROMPTS, max_new_tokens=8, stop_ids=[], pad_id=PAD, temperature=1.5, top_k=1,
                       generator=torch.Generator().manual_seed(3))
    assert sampled.completions == greedy


def test_sampling_is_reproducible_with_a_seeded_generator(checkpoints):
    model = load_model(checkpoints["qwen2"])

    def run(seed, **kw):
        return generate(model, PROMPTS, max_new_tokens=10, stop_ids=[], pad_id=PAD, temperature=1.0, top_p=0.95,
                        generator=torch.Generator().manual_seed(seed), **kw).completions

    first = run(0)
    assert run(0) == first and run(0, use_cache=False) == first
    assert run(1) != first


def test_hand_made_output_masks_labels_positions():
    from kdtune.generation import GenerationOutput

    # prompt width 3; row 0: prompt [a b], completion [c STOP]; row 1: prompt [d e f], completion [g h i]
    a, b, c, d, e, f, g, h, i, S, P = 11, 12, 13, 14, 15, 16, 17, 18, 19, 2, 0
    out = GenerationOutput(
        sequences=torch.tensor([[P, a, b, c, S, P], [d, e, f, g, h, i]]),
        prompt_width=3,
        prompt_lens=torch.tensor([2, 3]),
        completion_lens=torch.tensor([2, 3]),
        stopped=torch.tensor([True, False]),
        completions=[[c, S], [g, h, i]],
    )
    n = IGNORE_INDEX
    assert out.completion_mask.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    assert out.token_mask.tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert out.labels().tolist() == [[n, n, c, S, n, n], [n, n, g, h, i, n]]
    assert out.input_pos.tolist() == [[0, 0, 1, 2, 3, 3], [0, 1, 2, 3, 4, 5]]
    mask = out.attention_mask()
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(mask[1], causal)
    expected0 = causal & torch.tensor([0, 1, 1, 1, 1, 0], dtype=torch.bool)
    expected0[0, 0] = expected0[5, 5] = True  # padding attends to itself only
    assert torch.equal(mask[0], expected0)


def test_scoring_forward_reproduces_greedy_choices_and_trains(checkpoints):
    """The output's mask, positions and labels put each generated token where the model chose it;
    the model is back in train mode with no caches, and the batch can be backpropagated."""
    model = load_model(checkpoints["llama"]).train()
    free = generate(model, PROMPTS, max_new_tokens=8, stop_ids=[], pad_id=PAD).completions
    out = generate(model, PROMPTS, max_new_tokens=8, stop_ids={free[0][3], free[3][5]}, pad_id=PAD)
    assert model.training and all(m.training for m in model.modules()) and not model.caches_are_enabled()
    logits = model(out.sequences, mask=out.attention_mask(), input_pos=out.input_pos)
    labels = out.labels()
    trained = labels != IGNORE_INDEX
    assert trained.sum() == out.completion_lens.sum()
    assert torch.equal(logits.argmax(-1)[trained], labels[trained])
    F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX).backward()
    assert model.embed_tokens.weight.grad is not None
    # the datasets' right-padded form of the same prompts and completions trains the same tokens
    right = collate([prompt_completion_sample(p, c) for p, c in zip(PROMPTS, out.completions)], pad_id=PAD)
    for ours, theirs in zip(labels, right["labels"]):
        assert torch.equal(ours[ours != IGNORE_INDEX], theirs[theirs != IGNORE_INDEX])


def test_eval_mode_kept_and_vocab_size_cuts_padding_rows(checkpoints):
    model = load_model(checkpoints["qwen2"])  # eval mode
    out = generate(model, PROMPTS, max_new_tokens=20, stop_ids=[], pad_id=PAD, temperature=5.0, vocab_size=40,
                   generator=torch.Generator().manual_seed(0))
    assert not any(m.training for m in model.modules())
    assert max(max(c) for c in out.completions) < 40


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[[1], []]), "prompt 1 is empty"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_arguments_are_user_errors(checkpoints, kwargs, match):
    model = load_model(checkpoints["qwen2"])
    args = dict(prompts=[[1, 2]], max_new_tokens=4, stop_ids=[], pad_id=PAD) | kwargs
    with pytest.raises(KDTuneError, match=match):
        generate(model, **args)


def _head_in_form(module, weight, rows, form, monkeypatch):
    """The output head for ``weight`` in the given form: the forms are timed, then the choice forced."""
    monkeypatch.setattr(module, "_HEADS", {})
    module.output_head(weight, rows)  # times every form
    (seconds,) = module._HEADS.values()
    assert {"linear", "vocab-major"} <= seconds.keys()
    assert ("packed" in seconds) == ("setup" in seconds)
    assert "packed" not in seconds or module._packable(weight)  # packable, it may still fall back
    if form not in seconds:
        pytest.skip(f"no {form} form here")
    module._HEADS[next(iter(module._HEADS))] = {form: 0.0, "setup": 0.0}
    return module.output_head(weight, rows)


FORMS = ["linear", "vocab-major", "blocks", "packed"]


@pytest.mark.parametrize("form", FORMS)
def test_the_output_head_is_the_same_product_in_every_form(form, monkeypatch):
    """Generation times the forms of ``h @ weight.T`` once per shape and keeps the fastest for the
    number of steps; each gives those logits, row-major or vocabulary-major, and keeps giving them
    call after call."""
    module = importlib.import_module("kdtune.generation.generate")  # the package's `generate` is the function
    if form == "blocks":
        monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # one block per thread
    dtype = torch.float32 if form == "packed" else torch.float64  # oneDNN packs no float64
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    weight, hs = torch.randn(1000, 16, dtype=dtype), torch.randn(2, 3, 16, dtype=dtype)
    head = _head_in_form(module, weight, 3, form, monkeypatch)
    first = head(hs[0])
    assert (first.is_contiguous() or first.T.is_contiguous()) and first.dtype == dtype
    torch.testing.assert_close(first.clone(), hs[0] @ weight.T, **tol)
    torch.testing.assert_close(head(hs[1]), hs[1] @ weight.T, **tol)
    strided = torch.randn(3, 5, 16, dtype=dtype)[:, -1]  # as the decode step passes its last position
    torch.testing.assert_close(head(strided), strided @ weight.T, **tol)


@pytest.mark.parametrize("form", FORMS)
def test_a_strided_weight_gives_the_same_logits(form, monkeypatch):
    """A transposed copy's view (an output weight stored as [d, V]) in every form, timed or not."""
    module = importlib.import_module("kdtune.generation.generate")
    if form == "blocks":
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    weight = torch.randn(16, 1000).T  # [1000, 16], not contiguous
    h = torch.randn(3, 16)
    torch.testing.assert_close(_head_in_form(module, weight, 3, form, monkeypatch)(h), h @ weight.T,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_the_output_head_gives_bf16_logits_rounded_once(form, monkeypatch):
    """bf16 logits in every form: float32 sums of the products, rounded once to bf16 (no wider copy:
    greedy choice reads them as they are, sampling widens them)."""
    module = importlib.import_module("kdtune.generation.generate")
    if form == "blocks":
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    weight, h = torch.randn(1024, 32).bfloat16(), torch.randn(8, 32).bfloat16()
    logits = _head_in_form(module, weight, 8, form, monkeypatch)(h)
    assert logits.dtype == torch.bfloat16
    exact = (h.double() @ weight.double().T).float()
    torch.testing.assert_close(logits.float(), exact, rtol=2**-8, atol=1e-3)  # within bf16's rounding of the sum


def test_packing_the_head_is_chosen_only_when_the_steps_repay_it():
    module = importlib.import_module("kdtune.generation.generate")
    seconds = {"linear": 2.0, "vocab-major": 3.0, "packed": 1.0, "setup": 10.0}
    assert module._cheapest(seconds, 5) == "linear"  # 10 + 5 > 10
    assert module._cheapest(seconds, 20) == "packed"  # 10 + 20 < 40
    assert module._cheapest({"linear": 2.0, "vocab-major": 1.5}, 1) == "vocab-major"


@pytest.mark.parametrize("available, packed", [(None, True), (10**12, True), (4 * 4000 * 16 - 1, False)])
def test_the_packed_head_is_left_out_where_its_copy_would_take_too_much_memory(available, packed, monkeypatch):
    """The packed form holds a copy of the weight while a call lasts: only where it takes at most a
    quarter of the memory available (unknown: allowed), whatever the timings say."""
    module = importlib.import_module("kdtune.generation.generate")
    weight = torch.randn(4000, 16)  # 256,000 bytes: a quarter of 1,024,000
    monkeypatch.setattr(memory, "free_bytes", lambda device: available)
    key = (weight.device, weight.dtype, tuple(weight.shape), 3, torch.get_num_threads())
    monkeypatch.setattr(module, "_HEADS", {key: {"linear": 1.0, "vocab-major": 2.0, "packed": 0.0, "setup": 0.0}})
    offered = []
    cheapest = module._cheapest
    monkeypatch.setattr(module, "_cheapest", lambda seconds, steps: offered.append(set(seconds)) or cheapest(seconds, steps))
    h = torch.randn(3, 16)
    if packed and not module._packable(weight):
        pytest.skip("oneDNN cannot pack here")
    torch.testing.assert_close(module.output_head(weight, 3)(h), h @ weight.T, rtol=1e-5, atol=1e-5)
    assert ("packed" in offered[0]) == packed
    assert module._copy_fits(weight) == packed
