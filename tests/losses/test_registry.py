"""The losses' short names build from a YAML node, nested divergence included."""

from omegaconf import OmegaConf

from kdtune.config.instantiate import instantiate
from kdtune.config.registry import COMPONENTS
from kdtune.losses import FusedLinearKDLoss, GeneralizedJSDLoss


def test_loss_short_names_resolve():
    node = OmegaConf.create(
        {"_component_": "fused_kd", "kd_ratio": 0.5, "chunk_size": 64,
         "divergence": {"_component_": "jsd", "beta": 0.9, "temperature": 2.0}}
    )
    loss = instantiate(node)
    assert isinstance(loss, FusedLinearKDLoss) and isinstance(loss.divergence, GeneralizedJSDLoss)
    assert loss.divergence.beta == 0.9 and loss.chunk_size == 64
    for name in ["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "tvd", "cross_entropy"]:
        assert type(instantiate(OmegaConf.create({"_component_": name}))).__name__ == COMPONENTS[name].rsplit(".", 1)[1]
