"""Dice + cross-entropy loss whose batch value is the mean of per-sample losses.

DP-SGD clips each sample's gradient, which bounds a sample's influence only if
the batch loss is a sum (or mean) of per-sample terms. A Dice pooled over the
batch, or a cross-entropy normalised by the batch's count of valid pixels,
would let one image change the gradient of the others. Here every term is
computed per sample and normalised by that sample's own pixel count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import IGNORE_INDEX


class DiceCELoss(nn.Module):
    """``ce_weight * CE + dice_weight * (1 - soft Dice)``, averaged over samples.

    Parameters
    ----------
    ce_weight, dice_weight : float
        Weights of the two terms.
    smooth : float
        Added to numerator and denominator of the soft Dice (an empty mask with
        an empty prediction gives Dice 1, i.e. zero loss).
    ignore_index : int
        Target value of pixels to leave out of both terms.

    Notes
    -----
    Soft Dice is the mean over foreground classes ``1 .. C-1`` of
    ``(2 sum(p t) + s) / (sum(p) + sum(t) + s)`` per sample, ``p`` the softmax
    probability and ``t`` the one-hot target.
    """

    def __init__(
        self, ce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0, ignore_index: int = IGNORE_INDEX
    ) -> None:
        super().__init__()
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.smooth = smooth
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of :meth:`per_sample` (0 for an empty batch)."""
        losses = self.per_sample(logits, target)
        return losses.mean() if losses.numel() else logits.sum() * 0.0

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of each sample, shape ``(B,)``.

        Parameters
        ----------
        logits : Tensor
            ``(B, C, H, W)`` raw scores.
        target : Tensor
            ``(B, H, W)`` int64 class indices or ``ignore_index``.
        """
        if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(
                f"DiceCELoss: expected logits (B, C, H, W) and target (B, H, W), "
                f"received {tuple(logits.shape)} and {tuple(target.shape)}"
            )
        valid = target != self.ignore_index
        n_valid = valid.flatten(1).sum(1).clamp(min=1).to(logits.dtype)
        ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none")
        ce = ce.flatten(1).sum(1) / n_valid
        return self.ce_weight * ce + self.dice_weight * (1.0 - self._soft_dice(logits, target, valid))

    def _soft_dice(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        n_classes = logits.shape[1]
        weight = valid.unsqueeze(1).to(logits.dtype)
        probs = logits.softmax(dim=1) * weight
        onehot = F.one_hot(target.clamp(min=0) * valid, n_classes).permute(0, 3, 1, 2).to(logits.dtype) * weight
        dims = (2, 3)
        intersection = (probs * onehot).sum(dims)
        denominator = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * intersection + self.smooth) / (denominator + self.smooth)
        return dice[:, 1:].mean(1)
