"""The heatmap MLP (dense layers, batch norm, ReLU, dropout), its training with the epoch picked on held-out
patients, and its file: final_classifier.pth has ONE schema for both run kinds (classifier_file).

final_classifier.pth (torch.load(path, weights_only=True)):
    format_version, kind 'heatmap_mlp', run_kind 'single' | 'kfold'
    features 'heatmaps' | 'heatmaps+logits', cam_method (the maps it reads), model (state_dict), in_features,
    input_shape [3, S, S], model_order, grid_size, hidden_sizes, dropout, class_names, target_class_rule
    feature_mean, feature_std       the standardisation, fitted on its fit rows only (common.fusion.features)
    fit_rows, best_epoch, settings  which rows it learnt from, the epoch kept on its select rows, MlpSettings
    partition_digest                the digest of the run's split.json or folds.json
    checkpoint_sha256, heatmaps_sha256   arch -> [one per fold (a single split: one)]: the files it was fitted on;
                                    readers refuse it beside other ones, fold by fold
    temperatures                    column -> T: each CNN (on a K-fold run applied to the bagged P), the soft vote
                                    and 'final_mlp', fitted on held-out rows (common.evaluation.uncertainty)
    conformal                       alpha, row, image_scores, patient_scores: the held-out cases' sorted
                                    true-label scores, from which predict.py makes a set at any alpha
    calibration_protocol            where the temperatures and scores were fitted
"""

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.core.console import progress
from common.data.records import CLASS_NAMES
from common.evaluation.metrics import binary_metrics, selection_score, softmax
from common.fusion.features import Standardizer, build_features, stack_maps
from common.models.registry import MODEL_ORDER
from common.training.runtime import make_optimizer

CLASSIFIER_FORMAT_VERSION = 3  # 2: one schema for single-split and K-fold runs; 3: temperatures, conformal scores


def build_mlp(in_features: int, hidden_sizes: list[int], dropout: float) -> nn.Sequential:
    """Dense layers, each followed by batch norm, ReLU and dropout; a 2-class linear output."""
    layers, width = [], in_features
    for size in hidden_sizes:
        layers += [nn.Linear(width, size), nn.BatchNorm1d(size), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, 2))
    return nn.Sequential(*layers)


def mlp_from_classifier(classifier: dict) -> nn.Sequential:
    """The MLP a classifier file holds (classifier_file's), in eval mode."""
    mlp = build_mlp(classifier["in_features"], classifier["hidden_sizes"], classifier["dropout"])
    mlp.load_state_dict(classifier["model"])
    return mlp.eval()


def classifier_features(classifier: dict, cams_by_arch: dict[str, np.ndarray],
                        logits_by_arch: dict[str, np.ndarray] | None) -> np.ndarray:
    """The standardised input of a classifier file's MLP: each CNN's raw maps (of the classifier's cam_method) on
    its grid, and the logits when its feature set has them, with the statistics stored in the file."""
    maps = stack_maps(cams_by_arch, classifier["grid_size"])
    features = build_features(maps, logits_by_arch if classifier["features"] == "heatmaps+logits" else None)
    return Standardizer(classifier["feature_mean"].numpy(), classifier["feature_std"].numpy())(features)


def mlp_logits(model: nn.Module, features: np.ndarray, device: torch.device, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        parts = [model(torch.from_numpy(features[start:start + batch_size]).to(device)).float().cpu()
                 for start in range(0, len(features), batch_size)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, 2), np.float32)


def train_mlp(features: np.ndarray, labels: np.ndarray, patients: np.ndarray, fit_rows: np.ndarray,
              select_rows: np.ndarray, *, hidden_sizes: list[int], dropout: float, epochs: int, batch_size: int,
              lr: float, weight_decay: float, optimizer: str, seed: int, device: torch.device,
              desc: str) -> tuple[nn.Sequential, list[dict]]:
    """Train on fit rows; keep the epoch with the best balanced accuracy on the selection rows."""
    torch.manual_seed(seed)
    model = build_mlp(features.shape[1], hidden_sizes, dropout).to(device)
    optimizer = make_optimizer(model, name=optimizer, lr=lr, weight_decay=weight_decay)
    inputs = torch.from_numpy(features[fit_rows]).to(device)
    targets = torch.from_numpy(labels[fit_rows]).long().to(device)
    generator = torch.Generator().manual_seed(seed)
    best_score, best_state, history = None, None, []
    for epoch in progress(range(epochs), total=epochs, desc=desc):
        model.train()
        order = torch.randperm(len(inputs), generator=generator).to(device)
        loss_sum = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            if len(batch) < 2:  # batch norm needs two samples to estimate a variance
                continue
            loss = F.cross_entropy(model(inputs[batch]), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(batch)
        select_logits = mlp_logits(model, features[select_rows], device)
        select_loss = float(F.cross_entropy(torch.from_numpy(select_logits), torch.from_numpy(labels[select_rows])))
        metrics = binary_metrics(labels[select_rows], softmax(select_logits)[:, 1], patients[select_rows])
        score = selection_score({**metrics, "loss": select_loss})
        history.append({"epoch": epoch + 1, "fit_loss": loss_sum / max(len(order), 1), "select_loss": select_loss,
                        "select_balanced_accuracy": metrics["balanced_accuracy"],
                        "select_accuracy": metrics["accuracy"]})
        if best_score is None or score > best_score:
            best_score = score
            best_state = {key: value.detach().clone() for key, value in model.state_dict().items()}
            history[-1]["best_so_far"] = True
    model.load_state_dict(best_state)
    return model, history


@dataclass(frozen=True)
class MlpSettings:
    """The heatmap MLP's settings. These defaults are cancer_class_further.py's (its parser reads them here)."""

    grid_size: int = 14
    hidden_sizes: tuple[int, ...] = (256, 64)
    dropout: float = 0.3
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    seed: int = 0

    @classmethod
    def from_args(cls, args) -> "MlpSettings":
        """cancer_class_further.py's options (the parser names them as the fields are named)."""
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


def fit_mlp(features: np.ndarray, labels: np.ndarray, patients: np.ndarray, fit_rows: np.ndarray,
            select_rows: np.ndarray, settings: MlpSettings, device: torch.device, desc: str):
    """train_mlp on features standardised with the fit rows' statistics (never val's or test's); returns the MLP
    (at its best epoch on select_rows), the standardizer and the training history."""
    standardizer = Standardizer.fit(features, fit_rows)
    mlp, history = train_mlp(standardizer(features), labels, patients, fit_rows, select_rows,
                             hidden_sizes=list(settings.hidden_sizes), dropout=settings.dropout,
                             epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                             weight_decay=settings.weight_decay, optimizer=settings.optimizer, seed=settings.seed,
                             device=device, desc=desc)
    return mlp, standardizer, history


def best_epoch(history: list[dict]) -> int:
    """The epoch train_mlp kept (the last one marked best so far)."""
    return max(row["epoch"] for row in history if row.get("best_so_far"))


def uncertainty_fields(for_new_images: dict[str, dict], final_row: str, protocol: str) -> dict:
    """The classifier file's temperatures and conformal scores, from common.evaluation.uncertainty's fit for new
    images: per CNN and the soft vote, and the final row's as 'final_mlp'."""
    final = for_new_images[final_row]
    return {"temperatures": {**{key: float(for_new_images[key]["temperature"]) for key in (*MODEL_ORDER, "soft_vote")},
                             "final_mlp": float(final["temperature"])},
            "conformal": {"alpha": float(final["alpha"]), "row": final_row,
                          "image_scores": torch.from_numpy(np.asarray(final["image_scores"], dtype=np.float64)),
                          "patient_scores": torch.from_numpy(np.asarray(final["patient_scores"], dtype=np.float64))},
            "calibration_protocol": protocol}


def classifier_file(mlp: nn.Module, standardizer: Standardizer, *, run_kind: str, features: str, cam_method: str,
                    settings: MlpSettings, fit_rows: str, history: list[dict], target_class_rule: str,
                    partition_digest: str, checkpoint_sha256: dict[str, list[str]],
                    heatmaps_sha256: dict[str, list[str]], uncertainty: dict) -> dict:
    """The contents of final_classifier.pth (the module docstring lists them), for either run kind; uncertainty:
    uncertainty_fields'."""
    in_features = int(standardizer.mean.shape[0])
    return {
        "format_version": CLASSIFIER_FORMAT_VERSION, "kind": "heatmap_mlp", "run_kind": run_kind, "features": features,
        "cam_method": cam_method, "model": {key: value.detach().cpu() for key, value in mlp.state_dict().items()},
        "in_features": in_features, "input_shape": [len(MODEL_ORDER), settings.grid_size, settings.grid_size],
        "model_order": list(MODEL_ORDER), "grid_size": settings.grid_size,
        "hidden_sizes": list(settings.hidden_sizes), "dropout": settings.dropout,
        "feature_mean": torch.from_numpy(standardizer.mean), "feature_std": torch.from_numpy(standardizer.std),
        "fit_rows": fit_rows, "best_epoch": best_epoch(history), "settings": dataclasses.asdict(settings),
        "class_names": list(CLASS_NAMES), "target_class_rule": target_class_rule,
        "partition_digest": partition_digest,
        # Plain str: a numpy str_ in the file would make torch.load(weights_only=True) refuse it.
        "checkpoint_sha256": {arch: [str(digest) for digest in checkpoint_sha256[arch]] for arch in MODEL_ORDER},
        "heatmaps_sha256": {arch: [str(digest) for digest in heatmaps_sha256[arch]] for arch in MODEL_ORDER},
        **uncertainty,
    }
