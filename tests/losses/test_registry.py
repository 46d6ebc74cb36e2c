"""The losses' short names build from a YAML node, and a loss built by dotted path takes a nested
divergence node."""

from omegaconf import OmegaConf

from kdtune.config.instantiate import instantiate
from kdtune.config.registry import COMPONENTS
from kdtune.losses import GeneralizedJSDLoss, LinearKDLoss


def test_loss_short_names_resolve():
    node = OmegaConf.create(
        {"_component_": "kdtune.losses.LinearKDLoss", "form": "chunked", "chunk_size": 64,
         "divergence": {"_component_": "jsd", "beta": 0.9, "temperature": 2.0}}
    )
    loss = instantiate(node)
    assert isinstance(loss, LinearKDLoss) and isinstance(loss.divergence, GeneralizedJSDLoss)
    assert loss.divergence.beta == 0.9 and loss.fused.chunk_size == 64 and loss.form == "chunked"
    for name in ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]:
        assert type(instantiate(OmegaConf.create({"_component_": name}))).__name__ == COMPONENTS[name].rsplit(".", 1)[1]
