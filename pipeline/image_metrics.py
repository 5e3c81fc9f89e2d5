"""Image quality metrics and the tokenizer's collapse guard.

PSNR and SSIM come from scikit-image (``skimage.metrics``), averaged over images; LPIPS from the
optional ``lpips`` package when it can be built, otherwise never a stand-in number: ``"n/a"`` with
the reason. Images are numpy arrays (N, H, W, C) with values in [0, 1].

The collapse signal of the DreamerV4 notes (a tokenizer that outputs the mean image whatever its
input): the spread of the reconstructions across a batch relative to the spread of the inputs.
``CollapseGuard`` flags a run whose ratio stays below a threshold for several evaluations.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

log = logging.getLogger(__name__)

MAX_PSNR = 100.0  # dB, reported for a pixel-exact reconstruction (whose PSNR is infinite)
NA = "n/a"


def to_images(x: torch.Tensor) -> np.ndarray:
    """(..., C, H, W) tensor → (N, H, W, C) float32 numpy in [0, 1]."""
    x = x.detach().float().clamp(0, 1).cpu()
    return x.reshape(-1, *x.shape[-3:]).permute(0, 2, 3, 1).numpy()


def _check_pair(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"images must both be (N, H, W, C); got {pred.shape} and {target.shape}")


def psnr(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean PSNR (dB, data range 1) over images, each capped at MAX_PSNR."""
    _check_pair(pred, target)
    with np.errstate(divide="ignore"):
        values = [peak_signal_noise_ratio(t, p, data_range=1.0) for p, t in zip(pred, target)]
    return float(np.mean(np.minimum(values, MAX_PSNR)))


def ssim(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean SSIM over images (data range 1, channels as channels)."""
    _check_pair(pred, target)
    values = [structural_similarity(t, p, data_range=1.0, channel_axis=-1) for p, t in zip(pred, target)]
    return float(np.mean(values))


# -- LPIPS -------------------------------------------------------------------------------------


class LpipsUnavailable(RuntimeError):
    """LPIPS cannot be built here; the message says why."""


Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def load_lpips(net: str = "vgg", device: str | torch.device = "cpu") -> Distance:
    """LPIPS distance on (N, C, H, W) tensors in [0, 1] (grayscale is repeated to RGB), per image.

    Raises ``LpipsUnavailable`` with the reason when the package does not import or its network
    cannot be built (its backbone weights are downloaded on first use).
    """
    try:
        import lpips
    except Exception as exc:  # ImportError, or torchvision failing against this torch
        raise LpipsUnavailable(
            f"the optional 'lpips' package does not import ({type(exc).__name__}: {exc}); "
            "install the extra with: pip install -e '.[lpips]'"
        ) from None
    try:
        model = lpips.LPIPS(net=net, verbose=False)
    except Exception as exc:  # e.g. no network to fetch the backbone weights
        raise LpipsUnavailable(
            f"lpips.LPIPS(net={net!r}) could not be built ({type(exc).__name__}: {exc}); "
            "it downloads its backbone weights on first use"
        ) from None
    model = model.eval().requires_grad_(False).to(device)

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        return model(a * 2 - 1, b * 2 - 1).flatten()

    return distance


def lpips_or_reason(net: str = "vgg", device: str | torch.device = "cpu") -> tuple[Distance | None, str | None]:
    """``(distance, None)`` when LPIPS can be built, else ``(None, reason)``."""
    try:
        return load_lpips(net, device), None
    except LpipsUnavailable as exc:
        return None, str(exc)


# -- collapse ----------------------------------------------------------------------------------


def spread(x: np.ndarray | torch.Tensor) -> float:
    """Per-element standard deviation across the batch (axis 0), averaged."""
    if isinstance(x, torch.Tensor):
        return float(x.detach().float().std(dim=0, unbiased=False).mean())
    return float(np.asarray(x, dtype=np.float64).std(axis=0).mean())


def collapse_ratio(recon: np.ndarray | torch.Tensor, inputs: np.ndarray | torch.Tensor) -> float:
    """Spread of the reconstructions across a batch over the spread of the inputs (1: healthy)."""
    return spread(recon) / max(spread(inputs), 1e-8)


@dataclass
class CollapseGuard:
    """Flags collapse when the ratio stays below ``threshold`` for ``patience`` evaluations in a row.

    ``collapsed`` is the verdict on the latest evaluations: the streak reaches ``patience``, or every
    evaluation so far was below the threshold when fewer than ``patience`` were made.
    """

    threshold: float
    patience: int
    streak: int = 0
    evaluations: int = 0
    first_flagged_step: int | None = None

    def update(self, ratio: float, step: int, warn: bool = True) -> bool:
        """Record one evaluation; True (and a loud warning) once the streak reaches ``patience``."""
        self.evaluations += 1
        self.streak = self.streak + 1 if ratio < self.threshold else 0
        flagged = self.streak >= self.patience
        if flagged:
            if self.first_flagged_step is None:
                self.first_flagged_step = step
        if flagged and warn:
            log.warning(
                "COLLAPSE at step %d: reconstructions vary %.3f as much as their inputs (threshold %.3f) "
                "for %d evaluations in a row: the tokenizer outputs nearly the same image for every input",
                step, ratio, self.threshold, self.streak,
            )
        return flagged

    @classmethod
    def replay(cls, threshold: float, patience: int, evaluations: list[tuple[int, float]]) -> "CollapseGuard":
        """The guard's state after ``(step, ratio)`` evaluations (e.g. those of a resumed run), quietly."""
        guard = cls(threshold, patience)
        for step, ratio in evaluations:
            guard.update(ratio, step, warn=False)
        return guard

    @property
    def collapsed(self) -> bool:
        if self.evaluations == 0:
            return False
        return self.streak >= min(self.patience, self.evaluations)


def image_grid(rows: list[np.ndarray], n: int = 8) -> np.ndarray:
    """Rows of images (each (N, H, W, C) in [0, 1]) side by side: an (R*H, n*W, 3) uint8 grid."""
    out = []
    for r in rows:
        r = np.asarray(r[:n])
        if r.shape[-1] == 1:
            r = np.repeat(r, 3, axis=-1)
        out.append(np.concatenate(list(r), axis=1))
    return (np.clip(np.concatenate(out, axis=0), 0, 1) * 255).round().astype(np.uint8)
