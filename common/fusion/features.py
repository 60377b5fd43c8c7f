"""The final stage's input: the three CNNs' maps on one grid, stacked and flattened, optionally with their
logits, standardised with statistics of the fit rows only."""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.evaluation.metrics import softmax
from common.models.registry import ARCHS, MODEL_ORDER

FEATURE_SETS = ("heatmaps", "heatmaps+logits")


# The rows of every comparison table, in order, with the names people read: each CNN, then the combinations.
ROW_NAMES = {**{arch: ARCHS[arch].display_name for arch in MODEL_ORDER},
             "soft_vote": "Soft vote (mean probability)", "mlp_heatmaps": "MLP on heatmaps",
             "mlp_heatmaps+logits": "MLP on heatmaps + logits"}


def malignant_probabilities(logits_by_arch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """P(malignant) of each CNN, and their soft vote: the mean of the three probabilities."""
    probabilities = {arch: softmax(logits_by_arch[arch])[:, 1] for arch in MODEL_ORDER}
    probabilities["soft_vote"] = np.mean([probabilities[arch] for arch in MODEL_ORDER], axis=0)
    return probabilities


def stack_maps(cams_by_arch: dict[str, np.ndarray], grid_size: int) -> np.ndarray:
    """(N, 3, S, S) float32: each model's raw maps resized (bilinear) to the common grid, in MODEL_ORDER."""
    channels = []
    for arch in MODEL_ORDER:
        cams = torch.from_numpy(np.asarray(cams_by_arch[arch], dtype=np.float32))[:, None]  # (N, 1, h, w)
        channels.append(F.interpolate(cams, size=(grid_size, grid_size), mode="bilinear", align_corners=False))
    return torch.cat(channels, dim=1).numpy()


def build_features(maps: np.ndarray, logits_by_arch: dict[str, np.ndarray] | None) -> np.ndarray:
    """(N, 3*S*S) or, with logits, (N, 3*S*S + 6) float32."""
    features = maps.reshape(len(maps), -1)
    if logits_by_arch is not None:
        features = np.concatenate([features] + [logits_by_arch[arch] for arch in MODEL_ORDER], axis=1)
    return features.astype(np.float32)


# A heatmap cell whose spread over the fit rows is below this is constant for the MLP (often a border cell that
# never lights up). Its scale is 1, as scikit-learn's StandardScaler does for constant features: dividing by its
# tiny spread would turn float32 noise into a large input. The same image's Grad-CAM differs by ~1e-5 between
# batch sizes (the convolution algorithm depends on it): with a floor of 1e-6 instead, the final MLP's P of one
# image moved by 0.015 with the number of images scored beside it.
CONSTANT_SPREAD = 1e-4


@dataclass(frozen=True)
class Standardizer:
    mean: np.ndarray  # (F,)
    std: np.ndarray  # (F,), 1 for a constant feature

    @classmethod
    def fit(cls, features: np.ndarray, fit_rows: np.ndarray) -> "Standardizer":
        """Statistics of the fit rows alone: the rows the MLP learns from, never val or test."""
        chosen = features[fit_rows]
        spread = chosen.std(axis=0)
        return cls(chosen.mean(axis=0), np.where(spread < CONSTANT_SPREAD, 1.0, spread).astype(spread.dtype))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.std).astype(np.float32)
