"""Calibration images: a seeded sample of a data split's images, letterboxed as ultralytics validates.

Used by pruning (activation ranking, compensation, BN re-estimation) and by INT8 post-training quantization
(:mod:`yolo_prune.quantize`), so both see the same preprocessing.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from ..errors import DatasetError
from ..logs import Progress


def load_calibration_images(paths: Sequence[str | Path], *, n: int = 32, imgsz: int = 640, seed: int = 0,
                            progress: bool = False) -> torch.Tensor:
    """Return an ``(N, 3, imgsz, imgsz)`` float tensor in [0, 1] from ``n`` images drawn with ``seed``.

    Images are letterboxed like ultralytics' validation (aspect ratio kept, grey padding).
    Unreadable images are skipped; none readable is a :class:`DatasetError`. ``progress``: progress lines
    (:class:`~yolo_prune.logs.Progress`).
    """
    from ultralytics.data.augment import LetterBox

    paths = sorted(str(p) for p in paths)
    rng = random.Random(seed)
    chosen = rng.sample(paths, min(n, len(paths))) if paths else []
    letterbox = LetterBox((imgsz, imgsz), auto=False, scaleup=True)
    images = []
    for p in Progress("calibration images", len(chosen), unit="images", enabled=progress).iterate(chosen):
        im = cv2.imread(p)
        if im is None:
            continue
        im = letterbox(image=im)
        images.append(np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1)))  # BGR HWC -> RGB CHW
    if not images:
        raise DatasetError("no readable calibration images found in the data's train split")
    return torch.from_numpy(np.stack(images)).float() / 255.0
