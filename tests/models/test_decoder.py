"""The native decoder against transformers on the same weights, and its own consistency:
KV-cache decoding, packed rows, chunked output, hidden states, activation checkpointing."""

import pytest
import torch
import torch.nn.functional as F

from kdtune.checkpointing import load_model
from kdtune.generation import generate
from kdtune.modules.softcap import softcap
from tests.models.tiny import CONFIGS, make_checkpoint

VOCAB = CONFIGS["llama"]["vocab_size"]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    return make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


def tokens(b, s, seed=0):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("length", [48, 20])
def test_logits_match_transformers(checkpoint, length):
    """48 tokens reach past the sliding windows (8) and Phi-3's original context (32, so LongRoPE's
    long factors); 20 stay inside the latter (its short factors)."""
    transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation")
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model = load_model(checkpoint)
    x = tokens(2, length)
    with torch.no_grad():
        expected = reference(x).logits
        got = model(x)
    assert got.shape == (2, length, VOCAB)
    assert expected.abs().max() > 1  # logits of a size where 1e-5 is a real tolerance
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_greedy_generation_matches_transformers(checkpoint):
    """The same greedy continuations as transformers' generate, through the KV cache, for a prompt
    that together with its continuation outgrows the sliding windows (8)."""
    transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation")
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = tokens(1, 6, seed=7)
    with torch.no_grad():
        expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
    out = generate(load_model(checkpoint), [prompt[0].tolist()], max_new_tokens=16, stop_ids=[], pad_id=0)
    assert out.completions[0] == expected


def test_load_model_defaults(checkpoint):
    model = load_model(checkpoint)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_bfloat16_runs_close_to_float32(checkpoint):
    x = tokens(2, 16)
    with torch.no_grad():
        full = load_model(checkpoint)(x)
        model = load_model(checkpoint, dtype=torch.bfloat16)
        half = model(x)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert (half.float() - full).abs().max() < 0.1 * full.abs().max()


def test_kv_cache_incremental_equals_full_forward(checkpoint):
    model = load_model(checkpoint)
    x = tokens(2, 12)
    with torch.no_grad():
        full = model(x)
        model.setup_caches(batch_size=2, max_seq_len=16)
        steps = [model(x[:, :5])] + [model(x[:, i : i + 1]) for i in range(5, 12)]
        assert model.cache_size == 12
        model.reset_caches()
        again = model(x[:, :5])
        model.remove_caches()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, full[:, :5], atol=1e-5, rtol=0)
    assert not model.caches_are_enabled()


def test_kv_cache_left_padding_with_per_row_positions(checkpoint):
    """Row 1 is left-padded by 3 slots: masking them and starting its positions at 0 must give the
    logits of the unpadded prompt run alone. Padding attends to itself so no row is empty."""
    model = load_model(checkpoint)
    long, short = tokens(1, 8, seed=1)[0], tokens(1, 5, seed=2)[0]
    pad = 3
    batch = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    max_len = 10
    valid = torch.ones(2, max_len, dtype=torch.bool)
    valid[1, :pad] = False
    causal = torch.ones(max_len, max_len, dtype=torch.bool).tril()
    mask = causal & valid[:, None, :]
    mask[1, :pad] = torch.eye(max_len, dtype=torch.bool)[:pad]
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(short.unsqueeze(0))
        nxt = tokens(2, 1, seed=3)
        alone_next = model(torch.cat([short, nxt[1]]).unsqueeze(0))[:, -1]
        model.setup_caches(2, max_len)
        prefill = model(batch, mask=mask[:, :8], input_pos=positions[:, :8])
        step = model(nxt, mask=mask[:, 8:9], input_pos=positions[:, 8:9])
    torch.testing.assert_close(prefill[1, pad:], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[1, 0], alone_next[0], atol=1e-5, rtol=0)


def test_packed_row_equals_samples_run_alone(checkpoint):
    model = load_model(checkpoint)
    a, b = tokens(1, 7, seed=4), tokens(1, 9, seed=5)
    packed = torch.cat([a, b], dim=1)
    segment = torch.tensor([0] * 7 + [1] * 9)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    mask = (causal & (segment[:, None] == segment[None, :])).unsqueeze(0)
    positions = torch.cat([torch.arange(7), torch.arange(9)]).unsqueeze(0)
    with torch.no_grad():
        got = model(packed, mask=mask, input_pos=positions)
        expected = torch.cat([model(a), model(b)], dim=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_hidden_states_chunks_and_output_weight(checkpoint):
    model = load_model(checkpoint)
    x = tokens(2, 10)
    with torch.no_grad():
        logits = model(x)
        hidden = model(x, return_hidden=True)
        model.num_output_chunks = 3
        chunks = model(x)
    assert hidden.shape == (2, 10, model.args.hidden_size)
    torch.testing.assert_close(softcap(F.linear(hidden, model.output_weight), model.args.final_logit_softcapping),
                               logits)
    assert isinstance(chunks, list) and len(chunks) == 3
    torch.testing.assert_close(torch.cat(chunks, dim=1), logits)
    if model.args.tie_word_embeddings:
        assert model.output_weight is model.embed_tokens.weight and not hasattr(model, "lm_head")


def test_activation_checkpointing_gives_same_gradients(checkpoint):
    x = tokens(2, 10)

    def grads(recompute):
        model = load_model(checkpoint).train()
        model.enable_activation_checkpointing(recompute)
        model(x).float().logsumexp(-1).mean().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, recomputed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], msg=name)
