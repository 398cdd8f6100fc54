"""The parts of timm's model interface that :class:`xcit.XCiT` adds to ``reset_classifier`` and
``no_weight_decay``: ``get_classifier`` and ``group_matcher``, so timm's optimiser factory (``create_optimizer_v2``
with ``layer_decay``), its ``group_parameters`` and its fine-tuning scripts work on these models."""

from __future__ import annotations

from torch import nn


class TimmModelApi:
    """A mixin for :class:`xcit.XCiT`; pure torch, no state of its own."""

    head: nn.Module

    def get_classifier(self) -> nn.Module:
        """The classification head (``nn.Identity`` after ``reset_classifier(0)``)."""
        return self.head

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups in forward order, as timm's ``xcit.py`` defines them: the stem (patch embedding,
        positional encoding, class token), one group per XCA block, one per class-attention block, the final
        norm, the head (unmatched) last. timm's layer-wise lr decay over these groups gives each parameter the
        scale it gives timm's own XCiT (the ``layer_decay`` training key, :func:`xcit.train.optim.layer_id`, keeps the
        head in the class-attention group). ``coarse`` is accepted for timm's signature; the grouping is per block
        either way."""
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed",
            blocks=r"^blocks\.(\d+)",
            cls_attn_blocks=[(r"^cls_attn_blocks\.(\d+)", None), (r"^norm", (99999,))],
        )
