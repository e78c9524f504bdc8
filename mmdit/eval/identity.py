"""Where the portrait is, and whether it stays the same person: weight-free identity metrics.

Works on any frames of a centred talking portrait over a plain-ish background (the synthetic world,
frames decoded from a codec, generated frames): nothing here reads ground-truth geometry.

* :func:`to_unit_frames` -- frames as float32 ``[N, H, W, 3]`` in [0, 1]. Accepts uint8 (0..255) or
  float frames in **[-1, 1]** (mmdit's codec convention: ``VideoCodec.decode`` returns that range).
* :func:`locate_portrait` -- background colour from the image border, the foreground by colour
  contrast against it, the skin as the dominant foreground colour, the face box from the skin mask,
  and from the box the mouth region (the lower-middle face) and a cheek region.
* :func:`identity_metrics` -- consistency of the first frame with later frames: colour-histogram
  intersection, cosine similarity of centred thumbnails, and drift of the background and skin colours.

Colours are RGB in [0, 1]; colour distances are Euclidean in that cube (so at most sqrt(3)).
"""

from __future__ import annotations

import dataclasses

import numpy as np


def to_unit_frames(frames, name: str = "frames") -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` (0..255) or float in [-1, 1] -> float32 ``[N, H, W, 3]`` in [0, 1]."""
    x = np.asarray(frames)
    if x.ndim == 3 and x.shape[-1] == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"{name} must be [N, H, W, 3] RGB frames, got shape {x.shape}; "
            "drop the batch axis (frames[0]) for a batched [B, N, H, W, 3] array"
        )
    if x.shape[0] < 1 or min(x.shape[1:3]) < 16:
        raise ValueError(f"{name} of shape {x.shape} is too small to hold a portrait (need >= 16x16 pixels)")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be uint8 (0..255) or float in [-1, 1], got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf; check the decoder / sampler output")
    return np.clip((x.astype(np.float32) + 1.0) * 0.5, 0.0, 1.0)


def luma(x: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of RGB ``[..., 3]`` in [0, 1]."""
    return x @ np.array([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass(frozen=True)
class PortraitLayout:
    """Where things are in a clip (pixel rows/cols are half-open ``[start, stop)``)."""

    background: np.ndarray  # float32 [3]: median border colour over the clip
    skin: np.ndarray  # float32 [3]: dominant foreground colour
    face: tuple[int, int, int, int]  # (top, bottom, left, right) of the skin region
    mouth: tuple[int, int, int, int]  # (top, bottom, left, right): lower-middle face
    cheeks: tuple[int, int, int, int]  # (top, bottom, left, right): skin between the eyes and the mouth
    skin_mask: np.ndarray  # bool [H, W]: pixels of the clip's median frame that are skin
    found: bool = True  # False: no face stood out, the layout is centred_layout's guess (a failed generation)


def border_colours(x: np.ndarray, width: int = 2) -> np.ndarray:
    """Median colour of the ``width``-pixel image border of every frame: ``[N, 3]``."""
    border = np.concatenate(
        [
            x[:, :width].reshape(len(x), -1, 3),
            x[:, -width:].reshape(len(x), -1, 3),
            x[:, :, :width].reshape(len(x), -1, 3),
            x[:, :, -width:].reshape(len(x), -1, 3),
        ],
        axis=1,
    )
    return np.median(border, axis=1)


def locate_portrait(frames, name: str = "frames") -> PortraitLayout:
    """Finds background, skin, face box and the mouth region of a clip from its pixels alone.

    Raises ``ValueError`` when no face stands out from the background (a blank or uniform clip).
    """
    x = to_unit_frames(frames, name)
    _, h, w, _ = x.shape
    med = np.median(x, axis=0)  # [H, W, 3]: the clip's static appearance (mouth mostly closed)
    background = np.median(border_colours(med[None]), axis=0)
    contrast = np.linalg.norm(med - background, axis=-1)
    threshold = max(0.08, 0.4 * float(np.percentile(contrast, 99)))
    fg = contrast > threshold
    if fg.sum() < 0.02 * h * w:
        raise ValueError(
            f"{name}: no portrait found (only {int(fg.sum())} pixels differ from the background "
            f"colour {np.round(background * 255).astype(int).tolist()}); is the clip blank?"
        )
    # The skin is the dominant foreground colour: a coarse colour histogram's fullest cell, refined by
    # the median of the foreground pixels close to it.
    fgc = med[fg]
    cells = np.clip((fgc * 8).astype(int), 0, 7) @ np.array([64, 8, 1])
    mode = np.bincount(cells, minlength=512).argmax()
    seed = fgc[cells == mode].mean(axis=0)
    near = fgc[np.linalg.norm(fgc - seed, axis=-1) < 0.12]
    skin = np.median(near, axis=0) if len(near) else seed
    skin_mask = fg & (np.linalg.norm(med - skin, axis=-1) < max(0.15, 0.5 * np.linalg.norm(skin - background)))
    rows, cols = skin_mask.sum(axis=1), skin_mask.sum(axis=0)
    row_idx = np.nonzero(rows >= max(2, 0.2 * rows.max()))[0]
    col_idx = np.nonzero(cols >= max(2, 0.2 * cols.max()))[0]
    top, bottom = int(row_idx[0]), int(row_idx[-1]) + 1
    left, right = int(col_idx[0]), int(col_idx[-1]) + 1
    fh, fw = bottom - top, right - left
    if fh < 6 or fw < 6:
        raise ValueError(f"{name}: the face region found is only {fh}x{fw} pixels; is the clip a portrait?")
    return _portrait_layout(background, skin, (top, bottom, left, right), skin_mask)


def _portrait_layout(background, skin, face: tuple[int, int, int, int], skin_mask, found: bool = True) -> PortraitLayout:
    """A :class:`PortraitLayout` with the mouth and cheek boxes placed inside ``face`` (top, bottom, left, right)."""
    top, bottom, left, right = face
    fh, fw, cx = bottom - top, right - left, 0.5 * (left + right)
    box = lambda y0, y1, half: (  # noqa: E731
        top + int(round(y0 * fh)),
        top + int(round(y1 * fh)),
        int(round(cx - half * fw)),
        int(round(cx + half * fw)),
    )
    return PortraitLayout(
        np.asarray(background, np.float32),
        np.asarray(skin, np.float32),
        face,
        mouth=box(0.57, 0.93, 0.3),
        cheeks=box(0.45, 0.55, 0.2),
        skin_mask=skin_mask,
        found=found,
    )


def centred_layout(frames, name: str = "frames") -> PortraitLayout:
    """The layout of a portrait centred in the frame (face box: the middle half of the height and width; mouth,
    cheeks placed as :func:`locate_portrait` places them), ``found=False``. For clips where no face stands out
    (a generated clip that failed): their mouth track is read where a centred face's mouth would be, so the clip
    scores near chance instead of stopping the whole evaluation."""
    x = to_unit_frames(frames, name)
    _, h, w, _ = x.shape
    face = (h // 4, h - h // 4, w // 4, w - w // 4)
    med = np.median(x, axis=0)
    skin_mask = np.zeros((h, w), bool)
    skin_mask[face[0] : face[1], face[2] : face[3]] = True
    background = np.median(border_colours(med[None]), axis=0)
    return _portrait_layout(background, np.median(med[skin_mask], axis=0), face, skin_mask, found=False)


def locate_or_centre(frames, name: str = "frames") -> PortraitLayout:
    """:func:`locate_portrait`, or :func:`centred_layout` (``found=False``) where it finds no face."""
    try:
        return locate_portrait(frames, name)
    except ValueError:
        return centred_layout(frames, name)


def _histogram(x: np.ndarray, bins: int = 8) -> np.ndarray:
    """Joint RGB histograms of frames ``[N, H, W, 3]`` -> ``[N, bins**3]``, each summing to 1."""
    q = np.clip((x * bins).astype(np.int32), 0, bins - 1)
    cells = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    n = len(x)
    flat = cells.reshape(n, -1) + (np.arange(n) * bins**3)[:, None]
    hist = np.bincount(flat.ravel(), minlength=n * bins**3).reshape(n, bins**3).astype(np.float32)
    return hist / hist.sum(axis=1, keepdims=True)


def _thumbnails(x: np.ndarray, size: int = 16) -> np.ndarray:
    """Area-downsampled thumbnails ``[N, size*size, 3]`` (the image is cropped to a multiple of size)."""
    n, h, w, _ = x.shape
    fy, fx = max(1, h // size), max(1, w // size)
    x = x[:, : fy * (h // fy), : fx * (w // fx)]
    return x.reshape(n, h // fy, fy, w // fx, fx, 3).mean(axis=(2, 4)).reshape(n, -1, 3)


def identity_metrics(frames, layout: PortraitLayout | None = None, name: str = "frames") -> dict[str, float]:
    """Consistency of the portrait over time (first frame vs every later frame).

    Returns JSON-able floats:
      ``identity_hist_sim_mean`` / ``_min`` -- joint RGB histogram intersection (8^3 bins; 1 = same colours);
      ``identity_thumb_cos_mean`` / ``_min`` -- cosine similarity of 16x16 thumbnails centred on the first
      frame's mean colour (1 = same picture; ground-truth clips, with their head sway, blinks and mouth
      motion, stay above ~0.85; a different identity drops it below ~0.7, often below 0);
      ``background_drift_max`` -- largest distance of the per-frame border colour from frame 0's;
      ``skin_drift_max`` -- largest distance of the per-frame median colour inside the clip's skin mask
      from frame 0's (colour distances in RGB [0, 1] units).
    """
    x = to_unit_frames(frames, name)
    layout = layout or locate_portrait(x, name)
    hist = _histogram(x)
    hist_sim = np.minimum(hist[0], hist).sum(axis=1)[1:] if len(x) > 1 else np.ones(1)
    thumbs = _thumbnails(x)
    thumbs = (thumbs - thumbs[0].mean(axis=0)).reshape(len(x), -1)
    norms = np.linalg.norm(thumbs, axis=1) + 1e-8
    cos = (thumbs @ thumbs[0]) / (norms * norms[0])
    cos = cos[1:] if len(x) > 1 else np.ones(1)
    bg = border_colours(x)
    skin = np.median(x[:, layout.skin_mask], axis=1)  # [N, 3]
    return {
        "identity_hist_sim_mean": float(hist_sim.mean()),
        "identity_hist_sim_min": float(hist_sim.min()),
        "identity_thumb_cos_mean": float(cos.mean()),
        "identity_thumb_cos_min": float(cos.min()),
        "background_drift_max": float(np.linalg.norm(bg - bg[0], axis=1).max()),
        "skin_drift_max": float(np.linalg.norm(skin - skin[0], axis=1).max()),
    }
