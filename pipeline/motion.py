"""Motion estimation for the ``actions`` stage: a digit tracker (Moving MNIST) and global image
shift estimators (gameplay camera motion), both vectorised over many frame pairs.

Conventions: images are indexed ``[..., y, x]``; a shift ``s = (dx, dy)`` in pixels is the motion of
the content from image ``a`` to image ``b``, ``b(p) ≈ a(p - s)``; +x is right, +y is down.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.fft as sfft
from scipy import ndimage

from models.common import LUMA

CLASS_NAMES = ("none", "left", "right", "up", "down")
_WORKERS = 2
_LUMA = np.array(LUMA, np.float32)


# ---------------------------------------------------------------------------------------------
# images and regions


def to_gray(frames: np.ndarray) -> np.ndarray:
    """uint8 frames ``(..., H, W, C)`` (C in 1, 3) or ``(..., H, W)`` → float32 luma in [0, 1]."""
    f = np.asarray(frames)
    if f.ndim >= 3 and f.shape[-1] == 3:
        # Element-wise multiplies and adds, each rounded once in float32: the same bytes on every
        # CPU. Not ``f @ _LUMA``: NumPy hands that to OpenBLAS, whose kernel (chosen at run time by
        # the CPU: Haswell, Zen, SkylakeX...) sums in another order; the gameplay actions store
        # differed between an AMD Zen 2 and an Intel AVX-512 machine.
        c = f.astype(np.float32)
        return (c[..., 0] * _LUMA[0] + c[..., 1] * _LUMA[1] + c[..., 2] * _LUMA[2]) / np.float32(255)
    if f.ndim >= 3 and f.shape[-1] == 1:
        f = f[..., 0]
    return f.astype(np.float32) / 255.0


def area_bounds(height: int, width: int, fractions: Sequence[float]) -> tuple[int, int, int, int]:
    """Pixel rows/cols ``(top, bottom, left, right)`` (end exclusive) lying inside the fractions
    ``[top, bottom, left, right]`` of the image: partly covered border pixels are left out."""
    top, bottom, left, right = fractions
    t, l = int(np.ceil(top * height - 1e-6)), int(np.ceil(left * width - 1e-6))
    b, r = int(np.floor(bottom * height + 1e-6)), int(np.floor(right * width + 1e-6))
    if b - t < 2 or r - l < 2:
        raise ValueError(f"area {list(fractions)} of a {height}x{width} image is empty")
    return t, b, l, r


def centre_mask(height: int, width: int, size_px: float) -> np.ndarray:
    """Bool ``(height, width)``: False on the pixels touching the centred square of side ``size_px``
    (plus one pixel of margin for resampling blur), True elsewhere."""
    half = size_px / 2 + 1.0
    ys = np.arange(height) + 0.5 - height / 2
    xs = np.arange(width) + 0.5 - width / 2
    inside = (np.abs(ys)[:, None] < half) & (np.abs(xs)[None, :] < half)
    return ~inside


# ---------------------------------------------------------------------------------------------
# global shift estimation (camera motion)


def _tie_break(max_shift: int) -> np.ndarray:
    """A tiny cost growing with |s|: among equal scores (e.g. blank frames) the smallest shift wins."""
    r = np.arange(-max_shift, max_shift + 1, dtype=np.float64)
    return 1e-9 * (r[:, None] ** 2 + r[None, :] ** 2)


def _conj_times(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``conj(x) * y`` of complex arrays by real multiplies and adds, each rounded once.

    NumPy's complex multiply runs other SIMD code on other CPUs (fused multiply-adds from AVX2 on:
    other last bits), and the shifts picked from these spectra changed with it: the gameplay
    actions store differed with NumPy's x86-64-v3 code turned off (NPY_DISABLE_CPU_FEATURES).
    Real multiplies and adds are exact IEEE operations on every CPU."""
    xr, xi, yr, yi = x.real, x.imag, y.real, y.imag
    out = np.empty(np.broadcast_shapes(x.shape, y.shape), np.result_type(x, y))
    out.real = xr * yr + xi * yi
    out.imag = xr * yi - xi * yr
    return out


def _parabola(lo: np.ndarray, mid: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Offset of a parabola's vertex through (-1, lo), (0, mid), (1, hi), clipped to ±0.5."""
    den = lo - 2 * mid + hi
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where(np.abs(den) > 1e-12, 0.5 * (lo - hi) / den, 0.0)
    return np.clip(off, -0.5, 0.5)


def _pick(surface: np.ndarray, max_shift: int, subpixel: bool) -> np.ndarray:
    """Argmax of score surfaces ``(N, 2S+1, 2S+1)`` (index = shift + S) → shifts ``(N, 2)`` (dx, dy)."""
    n, size = surface.shape[0], surface.shape[1]
    flat = surface.reshape(n, -1).argmax(1)
    iy, ix = np.unravel_index(flat, surface.shape[1:])
    out = np.stack([ix, iy], 1).astype(np.float32) - max_shift
    if subpixel:
        rows = np.arange(n)
        inner_x = (ix > 0) & (ix < size - 1)
        inner_y = (iy > 0) & (iy < size - 1)
        xl, xh = np.clip(ix - 1, 0, size - 1), np.clip(ix + 1, 0, size - 1)
        yl, yh = np.clip(iy - 1, 0, size - 1), np.clip(iy + 1, 0, size - 1)
        mid = surface[rows, iy, ix]
        out[:, 0] += np.where(inner_x, _parabola(surface[rows, iy, xl], mid, surface[rows, iy, xh]), 0)
        out[:, 1] += np.where(inner_y, _parabola(surface[rows, yl, ix], mid, surface[rows, yh, ix]), 0)
    return out


def _check_pairs(a: np.ndarray, b: np.ndarray, max_shift: int, mask: np.ndarray | None) -> None:
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"expected two (N, H, W) stacks of equal shape, got {a.shape} and {b.shape}")
    h, w = a.shape[1:]
    if not 0 < max_shift < min(h, w) // 2:
        raise ValueError(f"max_shift {max_shift} must be in 1..{min(h, w) // 2 - 1} for {h}x{w} images")
    if mask is not None and mask.shape != (h, w):
        raise ValueError(f"mask shape {mask.shape} differs from the images' {(h, w)}")


def phase_correlation(
    a: np.ndarray, b: np.ndarray, *, max_shift: int, mask: np.ndarray | None = None,
    window: bool = False, subpixel: bool = False, batch: int = 256,
) -> np.ndarray:
    """Content shift ``(N, 2)`` (dx, dy) from ``a`` to ``b`` (float ``(N, H, W)``) by phase
    correlation: the peak, within ``max_shift``, of the inverse FFT of the normalised cross-power
    spectrum. ``mask`` (bool, True = used) zeroes pixels after mean removal; ``window`` applies a
    Hann window; ``subpixel`` refines the peak with a parabola per axis."""
    _check_pairs(a, b, max_shift, mask)
    h, w = a.shape[1:]
    weight = np.outer(np.hanning(h), np.hanning(w)) if window else np.ones((h, w))
    if mask is not None:
        weight = weight * mask
    rows = np.arange(-max_shift, max_shift + 1) % h
    cols = np.arange(-max_shift, max_shift + 1) % w
    out = np.empty((len(a), 2), np.float32)
    for s in range(0, len(a), batch):
        x = a[s : s + batch].astype(np.float64)
        y = b[s : s + batch].astype(np.float64)
        fa = sfft.rfft2((x - x.mean(axis=(1, 2), keepdims=True)) * weight, workers=_WORKERS)
        fb = sfft.rfft2((y - y.mean(axis=(1, 2), keepdims=True)) * weight, workers=_WORKERS)
        cross = _conj_times(fa, fb)
        cross /= np.sqrt(cross.real * cross.real + cross.imag * cross.imag) + 1e-9  # not np.abs: see _conj_times
        corr = sfft.irfft2(cross, s=(h, w), workers=_WORKERS)
        surface = corr[:, rows][:, :, cols] - _tie_break(max_shift)
        out[s : s + batch] = _pick(surface, max_shift, subpixel)
    return out


def block_matching(
    a: np.ndarray, b: np.ndarray, *, max_shift: int, mask: np.ndarray | None = None,
    subpixel: bool = False, batch: int = 256,
) -> np.ndarray:
    """Content shift ``(N, 2)`` (dx, dy) from ``a`` to ``b`` (float ``(N, H, W)``) by exhaustive
    search of every integer shift within ``max_shift``: the one with the least mean squared
    difference over the overlap of the two images (pixels where ``mask`` is False are left out of
    both). All shifts are scored at once with zero-padded FFT correlations."""
    _check_pairs(a, b, max_shift, mask)
    h, w = a.shape[1:]
    shape = (h + max_shift, w + max_shift)  # zero padding: no wrap-around within max_shift

    def fft(x: np.ndarray) -> np.ndarray:
        return sfft.rfft2(x, s=shape, workers=_WORKERS)

    def corr(fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
        """c(s) = sum_p x(p) y(p + s), at the shifts within max_shift."""
        c = sfft.irfft2(_conj_times(fx, fy), s=shape, workers=_WORKERS)
        return c[..., rows, :][..., cols]

    m = np.ones((h, w)) if mask is None else mask.astype(np.float64)
    rows = np.arange(-max_shift, max_shift + 1) % shape[0]
    cols = np.arange(-max_shift, max_shift + 1) % shape[1]
    fm = fft(m)
    count = np.maximum(corr(fm, fm), 1.0)
    out = np.empty((len(a), 2), np.float32)
    for s in range(0, len(a), batch):
        x = a[s : s + batch].astype(np.float64) * m
        y = b[s : s + batch].astype(np.float64) * m
        fx, fy = fft(x), fft(y)
        ssd = corr(fft(x * x), fm) + corr(fm, fft(y * y)) - 2 * corr(fx, fy)
        surface = -(ssd / count) - _tie_break(max_shift)
        out[s : s + batch] = _pick(surface, max_shift, subpixel)
    return out


# ---------------------------------------------------------------------------------------------
# discrete moves and scoring


def shift_classes(shift: np.ndarray, threshold: float) -> np.ndarray:
    """Camera shifts ``(N, 2)`` → int8 classes (0 none, 1 left, 2 right, 3 up, 4 down): the dominant
    axis when its magnitude reaches ``threshold``, else none."""
    shift = np.asarray(shift, np.float64)
    ax, ay = np.abs(shift[:, 0]), np.abs(shift[:, 1])
    horiz = (ax >= ay) & (ax >= threshold)
    vert = (ay > ax) & (ay >= threshold)
    out = np.zeros(len(shift), np.int8)
    out[horiz & (shift[:, 0] < 0)] = 1
    out[horiz & (shift[:, 0] > 0)] = 2
    out[vert & (shift[:, 1] < 0)] = 3
    out[vert & (shift[:, 1] > 0)] = 4
    return out


def move_classes(delta: np.ndarray) -> np.ndarray:
    """Grid moves ``(N, 2)`` (dx, dy; +x right, +y down) → int8 classes by their sign (any nonzero
    step counts; a diagonal counts as its larger axis)."""
    return shift_classes(np.sign(delta), 0.5)


def classification_report(pred: np.ndarray, true: np.ndarray, scored: np.ndarray) -> dict:
    """Accuracy and confusion (``confusion[true][pred]``) of the class arrays over ``scored``."""
    pred, true = np.asarray(pred)[scored], np.asarray(true)[scored]
    k = len(CLASS_NAMES)
    conf = np.zeros((k, k), np.int64)
    np.add.at(conf, (true.astype(np.int64), pred.astype(np.int64)), 1)
    return {
        "accuracy": float((pred == true).mean()) if len(true) else None,
        "scored": int(len(true)),
        "confusion": {
            CLASS_NAMES[i]: {CLASS_NAMES[j]: int(conf[i, j]) for j in range(k)} for i in range(k)
        },
        "true_counts": {CLASS_NAMES[i]: int(conf[i].sum()) for i in range(k)},
        "pred_counts": {CLASS_NAMES[j]: int(conf[:, j].sum()) for j in range(k)},
    }


def unchanged(a: np.ndarray, b: np.ndarray, mask: np.ndarray, tol: float) -> np.ndarray:
    """Bool ``(N,)``: the mean absolute difference of uint8 images ``a``, ``b`` (``(N, H, W[, C])``)
    over ``mask`` is below ``tol`` grey levels."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))[:, mask]
    return diff.mean(axis=tuple(range(1, diff.ndim))) < tol


# ---------------------------------------------------------------------------------------------
# digit tracking (Moving MNIST)


def component_box(frame: np.ndarray, rank: int, size: int, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Initialise a track in a float ``(H, W)`` frame without known positions.

    The rule: the connected components of pixels above ``threshold`` are ranked by area (largest
    first, ties by position); the ``rank``-th (clipped to the last one: overlapping digits merge)
    is taken. Returns the top-left ``(x, y)`` of the ``size``×``size`` box centred on the
    component's bounding box (clipped to the frame), and the template: the frame inside that box
    with the pixels of other components zeroed.
    """
    h, w = frame.shape
    labels, n = ndimage.label(frame > threshold)
    if n == 0:
        xy = np.array([(w - size) // 2, (h - size) // 2])
        return xy, frame[xy[1] : xy[1] + size, xy[0] : xy[0] + size].copy()
    areas = ndimage.sum_labels(np.ones_like(frame), labels, index=np.arange(1, n + 1))
    order = sorted(range(n), key=lambda i: (-areas[i], i))
    label = order[min(rank, n - 1)] + 1
    sl = ndimage.find_objects(labels)[label - 1]
    cy = (sl[0].start + sl[0].stop) / 2
    cx = (sl[1].start + sl[1].stop) / 2
    x = int(np.clip(round(cx - size / 2), 0, w - size))
    y = int(np.clip(round(cy - size / 2), 0, h - size))
    box = (slice(y, y + size), slice(x, x + size))
    template = np.where((labels[box] == 0) | (labels[box] == label), frame[box], 0.0)
    return np.array([x, y]), template.astype(np.float32)


def track_templates(
    frames: np.ndarray, start: np.ndarray, templates: np.ndarray, *, search: int,
    extra_weight: float = 0.05, sigma: float = 7.0, batch: int = 256,
) -> np.ndarray:
    """Track one template per sequence through float frames ``(N, T, H, W)`` in [0, 1].

    ``start`` ``(N, 2)``: the integer top-left ``(x, y)`` of the templates ``(N, h, w)`` in frame 0.
    Each next position is searched exhaustively within ``search`` pixels of the previous one,
    keeping the box inside the frame, for the least cost

        sum G T (T - I)^2  +  extra_weight * sum G (1 - T) I^2

    (T template, I image patch, G a Gaussian of ``sigma`` pixels around the box centre): the
    template's strokes must be found in the image, while bright pixels off the strokes (another
    digit overlapping: frames are the max of the digits) cost little, and pixels far from the
    centre (a digit is centred in its box, a neighbour is not) count less. Every position is
    scored at once with FFT correlations. After each step the template becomes the pixel-wise
    min of itself and the matched patch: bright pixels of another digit caught at initialisation
    fade out as it moves away, while the tracked digit, present in every frame, stays.
    Returns the top-left positions ``(N, T, 2)`` (x, y) as float32.
    """
    n, t, h, w = frames.shape
    th, tw = templates.shape[1:]
    ny, nx = h - th + 1, w - tw + 1
    yy, xx = np.arange(ny)[:, None], np.arange(nx)[None, :]
    gy = np.exp(-0.5 * ((np.arange(th) - (th - 1) / 2) / sigma) ** 2)
    gx = np.exp(-0.5 * ((np.arange(tw) - (tw - 1) / 2) / sigma) ** 2)
    gauss = np.outer(gy, gx).astype(np.float32)
    out = np.zeros((n, t, 2), np.float32)

    def corr(x: np.ndarray, fy: np.ndarray) -> np.ndarray:
        """c(p) = sum_q x(q) y(p + q) for the top-left positions p keeping the box in the frame."""
        fx = sfft.rfft2(x, s=(h, w), workers=_WORKERS)
        return sfft.irfft2(_conj_times(fx, fy), s=(h, w), workers=_WORKERS)[:, :ny, :nx]

    for s in range(0, n, batch):
        f = frames[s : s + batch].astype(np.float32)
        tmpl = templates[s : s + batch].astype(np.float32).copy()
        pos = np.asarray(start[s : s + batch], np.int64).copy()
        rows = np.arange(len(f))
        out[s : s + batch, 0] = pos
        for k in range(1, t):
            img = f[:, k]
            fi, fi2 = sfft.rfft2(img, workers=_WORKERS), sfft.rfft2(img * img, workers=_WORKERS)
            weight = gauss * (extra_weight + (1 - extra_weight) * tmpl)
            cost = (gauss * tmpl ** 3).sum(axis=(1, 2))[:, None, None]
            cost = cost - 2 * corr(gauss * tmpl * tmpl, fi) + corr(weight, fi2)
            oy, ox = yy - pos[:, 1, None, None], xx - pos[:, 0, None, None]
            cost = np.where((np.abs(oy) > search) | (np.abs(ox) > search), np.inf, cost)
            cost += 1e-6 * (oy ** 2 + ox ** 2)
            py, px = np.unravel_index(cost.reshape(len(f), -1).argmin(1), (ny, nx))
            pos = np.stack([px, py], 1)
            out[s : s + batch, k] = pos
            patch = np.stack([img[i, py[i] : py[i] + th, px[i] : px[i] + tw] for i in rows])
            tmpl = np.minimum(tmpl, patch)
    return out
