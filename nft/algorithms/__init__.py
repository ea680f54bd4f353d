"""Pure loss and advantage functions, registered by name. Tensors in, ``(loss, metrics)`` out; no I/O, no models.

    from nft.algorithms import policy_loss, batch_context, LOSSES
    loss, metrics = policy_loss("nft", logp=..., old_logp=..., mask=..., rewards=..., group_ids=..., eps=1.0)

See :mod:`nft.algorithms.core` for the micro-batch protocol and :mod:`nft.algorithms.losses` for the equations.
"""

from . import losses as _losses  # noqa: F401  (registers the losses)
from .core import (
    AGG_MODES,
    BATCH_RULES,
    LOSSES,
    agg_loss,
    agg_normalizer,
    batch_context,
    batch_rule,
    get_spec,
    group_stats,
    keep_rows,
    loss_normalizer,
    make_params,
    overlong_penalty,
    policy_loss,
    register_loss,
)

__all__ = [
    "AGG_MODES",
    "BATCH_RULES",
    "LOSSES",
    "agg_loss",
    "agg_normalizer",
    "batch_context",
    "batch_rule",
    "get_spec",
    "group_stats",
    "keep_rows",
    "loss_normalizer",
    "make_params",
    "overlong_penalty",
    "policy_loss",
    "register_loss",
]
