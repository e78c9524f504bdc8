"""Per-clip face boxes from OpenCV's frontal-face Haar cascade (the ingest's ``face_box``).

The cascade's weights ship inside the ``opencv-python-headless`` 4.x wheel
(``cv2.data.haarcascades``); nothing is downloaded. OpenCV 5 wheels no longer ship the cascades:
:class:`FaceBoxDetector` then fails at construction naming the fix (``pip install
"opencv-python-headless<5"``).

A clip's box: the cascade runs on ``num_probes`` evenly spaced frames (grey, histogram-equalised);
each frame keeps its largest detection; the clip's box is the per-coordinate median of those, as
normalised ``(x0, y0, x1, y1)`` in [0, 1] of the frame's width / height. When no probe finds a face
the box is :data:`FALLBACK_BOX` (the centre half of the frame) and ``found`` is False.
"""

from __future__ import annotations

import os

import numpy as np

CASCADE = "haarcascade_frontalface_default.xml"
FALLBACK_BOX = np.array([0.25, 0.25, 0.75, 0.75], np.float32)
FULL_FRAME_BOX = np.array([0.0, 0.0, 1.0, 1.0], np.float32)


class FaceBoxDetector:
    """Finds one face box per clip (module docstring). ``min_face``: smallest face side as a fraction
    of the frame's shorter side; ``num_probes``: frames examined per clip."""

    def __init__(self, min_face: float = 0.2, num_probes: int = 3):
        try:
            import cv2
        except ImportError as e:
            raise ImportError(
                "face boxes need OpenCV: pip install 'opencv-python-headless>=4.8,<5' (its wheel ships the Haar cascades)"
            ) from e
        path = os.path.join(getattr(getattr(cv2, "data", None), "haarcascades", "") or "", CASCADE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"OpenCV {cv2.__version__} ships no {CASCADE} (OpenCV 5 wheels dropped the Haar cascades); "
                "install the 4.x wheel: pip install 'opencv-python-headless>=4.8,<5'"
            )
        self._cv2 = cv2
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise RuntimeError(f"OpenCV could not load its bundled cascade {path}; reinstall opencv-python-headless<5")
        self.min_face, self.num_probes = float(min_face), int(num_probes)

    def frame_box(self, frame: np.ndarray) -> np.ndarray | None:
        """uint8 ``[H, W, 3]`` RGB -> float32 ``[4]`` normalised box of the largest face, or None."""
        cv2 = self._cv2
        h, w = frame.shape[:2]
        grey = cv2.equalizeHist(cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY))
        side = max(24, int(self.min_face * min(h, w)))  # the cascade's window is 24 px
        found = self._cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=3, minSize=(side, side))
        if len(found) == 0:
            return None
        x, y, bw, bh = max(found, key=lambda r: r[2] * r[3])
        return np.array([x / w, y / h, (x + bw) / w, (y + bh) / h], np.float32)

    def clip_box(self, frames: np.ndarray) -> tuple[np.ndarray, bool]:
        """uint8 ``[N, H, W, 3]`` -> (float32 ``[4]`` normalised box, whether a face was found)."""
        idx = np.unique(np.linspace(0, len(frames) - 1, self.num_probes).round().astype(int))
        boxes = [b for b in (self.frame_box(frames[i]) for i in idx) if b is not None]
        if not boxes:
            return FALLBACK_BOX.copy(), False
        return np.clip(np.median(np.stack(boxes), axis=0), 0.0, 1.0).astype(np.float32), True
