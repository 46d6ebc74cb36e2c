"""KDTuneLM scores and generates what lm-eval's own Hugging Face backend does on the same checkpoint."""

import pytest
import torch

pytest.importorskip("lm_eval", reason="evaluation needs the eval extra (lm-eval)")
pytest.importorskip("transformers", reason="lm-eval's Hugging Face backend (the reference) needs transformers")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from kdtune.checkpointing import load_model  # noqa: E402
from kdtune.eval import KDTuneLM  # noqa: E402
from kdtune.tokenization import load_tokenizer  # noqa: E402

MAX_LENGTH = 48  # short, so long requests are truncated and long texts take several windows

PAIRS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " Lyon, a city"),
    ("", "Hello world"),  # empty context: scored after the prefix token
    ("Two plus two is ", "four"),  # the trailing space moves to the continuation
    ("a " * 60, " b c"),  # longer than MAX_LENGTH: truncated on the left
    ("Question: 3+4=", "7"),
]
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 12, "short", "x"]
PROMPTS = ["The capital of France is", "1+1=", "Hello", "Once upon a time, " * 4]


def _requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def backends(qwen_checkpoint):
    hf = HFLM(pretrained=str(qwen_checkpoint), tokenizer=str(qwen_checkpoint), batch_size=4,
              max_length=MAX_LENGTH, device="cpu", dtype="float32")
    ours = KDTuneLM(load_model(qwen_checkpoint), load_tokenizer(qwen_checkpoint), batch_size=3, max_length=MAX_LENGTH)
    return hf, ours


def _assert_same_scores(want, have):
    assert [g for _, g in have] == [g for _, g in want]
    torch.testing.assert_close([lp for lp, _ in have], [lp for lp, _ in want], rtol=1e-5, atol=1e-4)


def test_loglikelihood_equals_hf_backend(backends):
    hf, ours = backends
    _assert_same_scores(hf.loglikelihood(_requests("loglikelihood", PAIRS)),
                        ours.loglikelihood(_requests("loglikelihood", PAIRS)))


def test_loglikelihood_rolling_equals_hf_backend(backends):
    hf, ours = backends
    requests = _requests("loglikelihood_rolling", [(t,) for t in TEXTS])
    assert len(ours.tok_encode(TEXTS[0])) > 2 * MAX_LENGTH  # several windows
    torch.testing.assert_close(ours.loglikelihood_rolling(requests), hf.loglikelihood_rolling(requests),
                               rtol=1e-5, atol=1e-3)


def test_greedy_generation_equals_hf_backend_and_is_greedy(backends):
    hf, ours = backends
    settings = {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}
    requests = _requests("generate_until", [(p, settings) for p in PROMPTS] + [(PROMPTS[0], {"max_gen_toks": 3})])
    generated = ours.generate_until(requests)
    assert generated == hf.generate_until(requests)
    assert all(generated)

    # The model's own greedy continuations are greedy by both backends' reckoning.
    pairs = [(p, g) for p, g in zip(PROMPTS, generated)]
    want, have = hf.loglikelihood(_requests("loglikelihood", pairs)), ours.loglikelihood(_requests("loglikelihood", pairs))
    _assert_same_scores(want, have)
    assert any(g for _, g in have)  # (re-encoding a generated text may give other tokens)


def test_stop_strings_cut_generations_like_hf_backend(backends):
    hf, ours = backends
    free = ours.generate_until(_requests("generate_until", [(p, {"max_gen_toks": 8}) for p in PROMPTS]))
    # Stop strings taken from inside the free generations, so every cut really happens.
    args = [(p, {"until": [text[2:4], "\n"], "max_gen_toks": 8}) for p, text in zip(PROMPTS, free)]
    cut = ours.generate_until(_requests("generate_until", args))
    assert cut == hf.generate_until(_requests("generate_until", args))
    assert all(len(c) < len(f) for c, f in zip(cut, free))


def test_chat_formatting_equals_hf_backend(backends):
    hf, ours = backends
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2="}]
    assert ours.apply_chat_template(chat) == hf.apply_chat_template(chat)
    prefilled = chat + [{"role": "assistant", "content": "The answer is "}]
    assert ours.apply_chat_template(prefilled, add_generation_prompt=False) == hf.apply_chat_template(
        prefilled, add_generation_prompt=False
    )


def test_batch_size_does_not_change_results(qwen_checkpoint, backends):
    _, ours = backends
    one = KDTuneLM(ours.model, ours.tokenizer, batch_size=1, max_length=MAX_LENGTH)
    _assert_same_scores(ours.loglikelihood(_requests("loglikelihood", PAIRS)),
                        one.loglikelihood(_requests("loglikelihood", PAIRS)))
    requests = _requests("generate_until", [(p, {"max_gen_toks": 5}) for p in PROMPTS])
    assert one.generate_until(requests) == ours.generate_until(requests)


def test_scores_are_those_of_the_capped_logits(qwen_checkpoint, tmp_path):
    """A model that caps its final logits (Gemma 2) is scored on the capped logits its forward
    returns; with a cap this low, the uncapped scores would differ."""
    import shutil

    from kdtune.checkpointing import write_random_checkpoint
    from tests.models.tiny import qwen_tokenizer_config

    config = qwen_tokenizer_config(model_type="gemma2", head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                                   attn_logit_softcapping=5.0, final_logit_softcapping=2.0, initializer_range=0.5)
    folder = write_random_checkpoint(config, tmp_path / "gemma2", seed=0)
    for file in qwen_checkpoint.iterdir():
        if not file.name.startswith(("model", "config")):
            shutil.copy(file, folder / file.name)
    model = load_model(folder)
    lm = KDTuneLM(model, load_tokenizer(folder), batch_size=2, max_length=MAX_LENGTH)
    scores = lm.loglikelihood(_requests("loglikelihood", PAIRS[:2]))
    for (context, continuation), (score, _) in zip(PAIRS[:2], scores):
        ctx, cont = lm._encode_pair(context, continuation)
        tokens = torch.tensor([ctx + cont])[:, :-1]
        with torch.no_grad():
            logits = model(tokens)[0, -len(cont):]
            raw = torch.nn.functional.linear(model(tokens, return_hidden=True)[0, -len(cont):], model.output_weight)
        targets = torch.tensor(cont)
        capped = logits.log_softmax(-1).gather(1, targets[:, None]).sum()
        uncapped = raw.log_softmax(-1).gather(1, targets[:, None]).sum()
        assert score == pytest.approx(float(capped), rel=1e-5)
        assert abs(float(uncapped) - float(capped)) > 0.1
