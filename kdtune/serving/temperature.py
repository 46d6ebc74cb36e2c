"""The KD temperature applied to top-k log-probabilities taken at temperature 1.

vLLM's prompt log-probabilities are the model's at temperature 1, whatever the request says. At
temperature T the top-k ids' probabilities are proportional to ``p_i ** (1/T)``; what is unknown is
the tail: ``sum_j p_j ** (1/T)`` over the ids outside the top k, of which only the total ``m`` is
known (``1 - sum_i p_i``), and that no tail token is more likely than the k-th, ``p_k``. For T > 1
(``x ** (1/T)`` concave) the tail's tempered mass is

- at least ``n p_k^(1/T) + r^(1/T)``: ``m`` packed into as few tokens as allowed (n = floor(m / p_k)
  tokens at p_k and one holding the rest r), and
- at most ``(V - k)^(1 - 1/T) m^(1/T)``: ``m`` spread evenly over the other V - k tokens;

for T < 1 the two bounds swap. The estimate is their geometric mean. On the real SmolLM2-135M at
T = 2 the tempered tail holds about 70% of the mass; the two bounds miss it by a factor ~2 each way,
the geometric mean by a few percent (docs/serving.md has the numbers; a test holds it to them).
"""

import torch


def tail_bounds(logprobs: torch.Tensor, temperature: float, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tempered (unnormalized, ``sum_j p_j^(1/T)``) tail mass's two bounds ``[N]``, float64: the
    packed one and the spread one (lower and upper for T > 1, upper and lower for T < 1)."""
    lp = logprobs.double()
    a = 1.0 / temperature
    m = (-torch.expm1(lp.logsumexp(-1))).clamp_min(0.0)  # the tail's mass at temperature 1
    p_k = lp.min(-1).values.exp()
    n = torch.floor(m / p_k)
    r = (m - n * p_k).clamp_min(0.0)
    packed = n * p_k.pow(a) + r.pow(a)
    others = vocab_size - logprobs.shape[-1]
    spread = m.pow(a) * others ** (1.0 - a) if others > 0 else torch.zeros_like(m)
    return packed, spread


def temper_topk(logprobs: torch.Tensor, temperature: float, vocab_size: int) -> torch.Tensor:
    """Top-k log-probabilities ``[N, k]`` at temperature 1 → at ``temperature``, normalized over the
    k ids plus the estimated tail (the geometric mean of `tail_bounds`), float32. At T = 1 the rows
    come back unchanged."""
    if temperature == 1.0:
        return logprobs.float()
    packed, spread = tail_bounds(logprobs, temperature, vocab_size)
    tail = (packed * spread).sqrt()
    scaled = logprobs.double() / temperature
    total = torch.logaddexp(scaled.logsumexp(-1), tail.log())  # log(sum p_i^(1/T) + tail); log 0 = -inf is fine
    return (scaled - total[:, None]).float()
