"""Image-quality figures a viewer would agree with, weight-free: a Fréchet distance on fixed per-frame
features, background flicker energy, and identity against a given reference frame.

**Feature** (:func:`frame_features`, 80 dims per frame, frames in [0, 1]):
  * 48 = a 4x4 area-downsampled RGB thumbnail (layout and colours);
  * 32 = ``log10(1e-4 + h)`` of gradient-orientation histograms ``h`` (8 unsigned orientations over
    [0, pi), weighted by the gradient magnitude of the luma, central differences, divided by the cell's
    pixel count) in each cell of a 2x2 grid. Blocky 8x8 codec residue and speckle raise the gradient
    energy in orientations and cells that are flat in clean frames -- by orders of magnitude, hence the
    log; a wrong colour moves the thumbnail part.

**Fréchet distance** (:func:`frechet_distance`): ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``
between Gaussians fitted to two feature sets (FID's formula on these features; not comparable to FID).
:func:`split_fd` compares generated clips ``[:h]`` with ground-truth clips ``[h:]`` and, as the floor,
ground-truth ``[:h]`` with the same ``[h:]`` (same sample sizes, so the small-sample bias is shared).

**Background flicker** (:func:`background_flicker`): mean over frame pairs and background pixels of the
squared frame-to-frame RGB difference (units: [0, 1]^2). Background = pixels of the clip's median frame
that are not foreground (colour far from the border colour) nor within 2 pixels of it, nor in the face
box :func:`mmdit.eval.identity.locate_portrait` finds; a static clip scores 0. Its mean over clips hides what
kind of flicker it is: a background that shimmers by a grey level in every frame, or a clean clip with one
glitched frame. :func:`background_flicker_pairs` gives the per-frame-pair values the eval summarises both ways
(median over clips; the worst single frame pair).
"""

from __future__ import annotations

import numpy as np

from mmdit.eval.identity import _histogram, _thumbnails, border_colours, locate_portrait, luma, to_unit_frames

FEATURE_DIM = 80


def frame_features(frames, name: str = "frames") -> np.ndarray:
    """``frames`` uint8 ``[N, H, W, 3]`` or float in [-1, 1] -> float64 ``[N, 80]`` (see module doc)."""
    x = to_unit_frames(frames, name).astype(np.float64)
    n, h, w, _ = x.shape
    thumb = _thumbnails(x, 4).reshape(n, -1)  # [N, 48]
    y = luma(x.astype(np.float32)).astype(np.float64)
    gy = np.zeros_like(y)
    gx = np.zeros_like(y)
    gy[:, 1:-1] = 0.5 * (y[:, 2:] - y[:, :-2])
    gx[:, :, 1:-1] = 0.5 * (y[:, :, 2:] - y[:, :, :-2])
    mag = np.hypot(gx, gy)
    ori = np.clip((np.mod(np.arctan2(gy, gx), np.pi) / np.pi * 8).astype(np.int64), 0, 7)
    hog = []
    for rows in (slice(0, h // 2), slice(h // 2, h)):
        for cols in (slice(0, w // 2), slice(w // 2, w)):
            m, o = mag[:, rows, cols].reshape(n, -1), ori[:, rows, cols].reshape(n, -1)
            cell = np.stack([(m * (o == b)).sum(axis=1) for b in range(8)], axis=1) / m.shape[1]
            hog.append(np.log10(1e-4 + cell))
    return np.concatenate([thumb, *hog], axis=1)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a [Na, D]`` and ``b [Nb, D]``
    (``Na, Nb >= 2``); 0 for identical sets. The matrix square root goes through symmetric
    eigendecompositions: ``tr((S_a S_b)^(1/2)) = sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance needs two [N >= 2, D] feature sets of the same D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_cross = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(max(0.0, ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_cross))


TEXTURE = slice(48, 80)  # the gradient-orientation part of frame_features


def split_fd(generated: list, ground_truth: list) -> dict[str, float | None]:
    """``{fd, fd_floor, fd_texture, fd_texture_floor}`` for clips (each ``[N, H, W, 3]``): generated
    ``[:h]`` vs ground truth ``[h:]`` and ground truth ``[:h]`` vs ``[h:]``, ``h = len // 2``, on all 80
    features and on the 32 gradient-orientation ones alone (``_texture``: blockiness and speckle, less
    sensitive to which identities fell in each half). All None with fewer than 2 clips. With few clips
    the halves hold different identities, so the colour part of the floor is large: compare a task with
    the floor, not with 0."""
    k = min(len(generated), len(ground_truth))
    if k < 2:
        return dict.fromkeys(("fd", "fd_floor", "fd_texture", "fd_texture_floor"))
    h = k // 2
    feats = lambda clips: np.concatenate([frame_features(c) for c in clips])  # noqa: E731
    gen, gt_a, ref = feats(generated[:h]), feats(ground_truth[:h]), feats(ground_truth[h : 2 * h])
    t = TEXTURE
    return {
        "fd": frechet_distance(gen, ref),
        "fd_floor": frechet_distance(gt_a, ref),
        "fd_texture": frechet_distance(gen[:, t], ref[:, t]),
        "fd_texture_floor": frechet_distance(gt_a[:, t], ref[:, t]),
    }


def background_mask(frames, name: str = "frames") -> np.ndarray:
    """bool ``[H, W]``: the clip's background pixels (see module doc); falls back to the 2-pixel image
    border when fewer than 5% of the pixels qualify."""
    x = to_unit_frames(frames, name)
    med = np.median(x, axis=0)
    bg = np.median(border_colours(med[None]), axis=0)
    contrast = np.linalg.norm(med - bg, axis=-1)
    fg = contrast > max(0.08, 0.4 * float(np.percentile(contrast, 99)))
    try:
        top, bottom, left, right = locate_portrait(x, name).face
        fg[top:bottom, left:right] = True
    except ValueError:
        pass  # no face found: the colour contrast alone decides
    grown = fg.copy()
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            grown |= np.roll(np.roll(fg, dy, axis=0), dx, axis=1)
    mask = ~grown
    if mask.mean() < 0.05:
        mask = np.zeros_like(mask)
        mask[:2], mask[-2:], mask[:, :2], mask[:, -2:] = True, True, True, True
    return mask


def background_flicker_pairs(frames, name: str = "frames") -> np.ndarray:
    """``float [N - 1]``: per consecutive frame pair of ``frames`` (``[N >= 2, H, W, 3]``), the mean squared
    RGB difference over the background pixels, in [0, 1]^2 units (one grey level of change on every
    background pixel is ``1 / 255**2 = 1.5e-5``)."""
    x = to_unit_frames(frames, name)
    if len(x) < 2:
        raise ValueError(f"{name}: flicker needs >= 2 frames, got {len(x)}")
    mask = background_mask(x, name)
    d = np.diff(x, axis=0)[:, mask]  # [N - 1, P, 3]
    return (d * d).mean(axis=(1, 2))


def background_flicker(frames, name: str = "frames") -> float:
    """Mean squared frame-to-frame RGB difference over the background pixels of ``frames``
    (``[N >= 2, H, W, 3]``), in [0, 1]^2 units; 0 for a static clip (the mean of
    :func:`background_flicker_pairs`)."""
    return float(background_flicker_pairs(frames, name).mean())


def identity_vs_reference(frames, reference, name: str = "frames") -> dict[str, float]:
    """How much every frame of ``frames [N, H, W, 3]`` keeps the identity of ``reference [H, W, 3]``
    (e.g. the first frame given to TI2AV): ``{identity_ref_hist_sim, identity_ref_thumb_cos}``, the means
    over frames of the joint RGB histogram intersection (1 = same colours) and of the cosine similarity
    of 16x16 thumbnails centred on the reference's mean colour (as :func:`identity_metrics`)."""
    x = to_unit_frames(frames, name)
    ref = to_unit_frames(np.asarray(reference)[None], "reference")
    if ref.shape[1:] != x.shape[1:]:
        raise ValueError(f"reference frame {ref.shape[1:]} and {name} {x.shape[1:]} differ in size")
    hist, hist_ref = _histogram(x), _histogram(ref)[0]
    t, t_ref = _thumbnails(x), _thumbnails(ref)
    centre = t_ref[0].mean(axis=0)
    t, t_ref = (t - centre).reshape(len(x), -1), (t_ref - centre).reshape(-1)
    cos = (t @ t_ref) / (np.linalg.norm(t, axis=1) * np.linalg.norm(t_ref) + 1e-8)
    return {
        "identity_ref_hist_sim": float(np.minimum(hist, hist_ref).sum(axis=1).mean()),
        "identity_ref_thumb_cos": float(cos.mean()),
    }
