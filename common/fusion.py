"""The final stage's pieces: align the three heatmap files, turn maps into features, the MLP and its training.

Features: each model's raw Grad-CAM maps resized to one S x S grid and stacked, (N, 3, S, S), flattened;
optionally followed by the three models' logits (N, 6). They are standardised with a mean and standard
deviation fitted on the MLP's fit rows only, and stored with the classifier.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.cli import heatmaps_only_command
from common.console import progress
from common.data import SPLIT_FILE_NAME, Split, load_split
from common.errors import PipelineError
from common.fileio import sha256_of_file
from common.heatmaps import load_heatmaps
from common.metrics import binary_metrics, selection_score, softmax
from common.checkpoints import load_checkpoint
from common.models import ARCHS, MODEL_ORDER
from common.runfiles import FURTHER_SCRIPT, RESULTS_JSON, checkpoint_path, heatmap_path
from common.runtime import make_optimizer

FEATURE_SETS = ("heatmaps", "heatmaps+logits")
# The rows of every comparison table, in order, with the names people read: each CNN, then the combinations.
ROW_NAMES = {**{arch: ARCHS[arch].display_name for arch in MODEL_ORDER},
             "soft_vote": "Soft vote (mean probability)", "mlp_heatmaps": "MLP on heatmaps",
             "mlp_heatmaps+logits": "MLP on heatmaps + logits"}
# Same images, order, labels and splits, and maps made by the same target-class rule.
ALIGNED_KEYS = ("paths", "labels", "splits", "patients", "magnifications", "target_class_rule")
CLASSIFIER_FORMAT_VERSION = 1


def load_aligned_heatmaps(output_dir: Path, paths: dict[str, Path] | None = None) -> dict[str, dict]:
    """The three heatmap files, checked to describe the same images in the same order, labels and splits."""
    paths = paths or {arch: heatmap_path(output_dir, arch) for arch in MODEL_ORDER}
    loaded = {}
    for arch in MODEL_ORDER:
        if not Path(paths[arch]).is_file():
            raise PipelineError(f"heatmap file {paths[arch]} is missing: run {ARCHS[arch].script} --output-dir "
                                f"{output_dir} first (or --heatmaps-only if its checkpoint exists)")
        loaded[arch] = load_heatmaps(paths[arch])
        if str(loaded[arch]["arch"]) != arch:
            raise PipelineError(f"{paths[arch]} holds heatmaps of {loaded[arch]['arch']}, not {arch}")
    reference_arch = MODEL_ORDER[0]
    reference = loaded[reference_arch]
    for arch in MODEL_ORDER[1:]:
        for key in ALIGNED_KEYS + ("split_digest",):
            ours, theirs = loaded[arch][key], reference[key]
            if ours.shape != theirs.shape:
                raise PipelineError(f"{paths[arch]} has {len(ours)} rows, {paths[reference_arch]} has {len(theirs)}: "
                                    "rerun the model scripts with the same --output-dir and --max-images")
            if not np.array_equal(ours, theirs):
                row = int(np.flatnonzero(np.atleast_1d(ours != theirs))[0]) if ours.ndim else 0
                raise PipelineError(
                    f"{paths[arch]} and {paths[reference_arch]} differ in '{key}' (first at row {row}: "
                    f"{np.atleast_1d(ours)[row]!r} vs {np.atleast_1d(theirs)[row]!r}); rerun the model scripts "
                    "on one split (same --output-dir)")
    return loaded


def check_made_by_checkpoint(arch: str, heatmap_file: Path, heatmaps: dict, checkpoint_file: Path,
                             checkpoint_sha256: str, *, rerun_further: bool = False) -> None:
    """Refuse maps made by another checkpoint than the one beside them: a model script rerun that wrote its new
    checkpoint and then stopped (a failed export, a full disk) leaves the old maps next to the new model.
    `rerun_further`: the message also says to rerun FURTHER_SCRIPT (for readers of its results)."""
    if str(heatmaps["checkpoint_sha256"]) == checkpoint_sha256:
        return
    output_dir = Path(checkpoint_file).parent  # where --heatmaps-only reads the checkpoint and writes the maps
    command = heatmaps_only_command(ARCHS[arch].script, load_checkpoint(checkpoint_file, arch)["config"], output_dir)
    then = f", then rerun python {FURTHER_SCRIPT} --output-dir {output_dir}" if rerun_further else ""
    raise PipelineError(f"{heatmap_file} is stale: it was made by another checkpoint than {checkpoint_file} (a rerun "
                        f"of {ARCHS[arch].script} that stopped before its heatmap export finished?); regenerate it with "
                        f"{command}{then}")


def check_checkpoints(output_dir: Path, heatmap_files: dict[str, Path], heatmaps: dict[str, dict]) -> dict[str, str]:
    """Each model's checkpoint in output_dir loads and made that model's maps; returns their SHA-256 digests
    (hashed once here: the classifier records them)."""
    digests = {}
    for arch in MODEL_ORDER:
        checkpoint_file = checkpoint_path(output_dir, arch)
        load_checkpoint(checkpoint_file, arch, made_by=ARCHS[arch].script)  # a truncated file is an error, not a digest
        digests[arch] = sha256_of_file(checkpoint_file)
        check_made_by_checkpoint(arch, heatmap_files[arch], heatmaps[arch], checkpoint_file, digests[arch])
    return digests


def read_results(output_dir: Path) -> dict:
    """FURTHER_SCRIPT's results.json, or an error saying how to make it."""
    path = Path(output_dir) / RESULTS_JSON
    if not path.is_file():
        raise PipelineError(f"{path} is missing: run {FURTHER_SCRIPT} --output-dir {output_dir} first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise PipelineError(f"{path} is unreadable ({error}); rerun {FURTHER_SCRIPT}") from None


def check_listed_in_results(results: dict, path: Path) -> None:
    """`path`, written by FURTHER_SCRIPT, must be the very file its results.json lists (same SHA-256): a run
    stopped between its renames, or files of two runs, would pair a classifier with another run's results."""
    listed = results.get("outputs", {}).get(Path(path).name)
    if listed is None or listed != sha256_of_file(path):
        reason = "is not the file it lists" if listed else "lists no such file (written by an older version)"
        raise PipelineError(f"{path} does not belong to the {RESULTS_JSON} beside it ({RESULTS_JSON} {reason}); "
                            f"rerun python {FURTHER_SCRIPT} --output-dir {Path(path).parent}")


def load_run_heatmaps(output_dir: Path, heatmap_files: dict[str, Path] | None = None) -> tuple[dict, Split]:
    """A finished single-split run's split.json and its three aligned heatmap files (or `heatmap_files`), the files
    checked to follow the split file row by row."""
    split_file = Path(output_dir) / SPLIT_FILE_NAME
    if not split_file.is_file():
        raise PipelineError(f"{split_file} is missing: --output-dir must be where the model scripts ran")
    split = load_split(split_file)
    heatmaps = load_aligned_heatmaps(output_dir, heatmap_files)
    check_against_split(heatmaps[MODEL_ORDER[0]], split)
    return heatmaps, split


def check_against_split(heatmaps: dict, split) -> None:
    """Every heatmap row must be a row of split.json with the same label and split, in the file's order."""
    row_of = {record.path: index for index, record in enumerate(split.records)}
    rows = [row_of.get(path, -1) for path in heatmaps["paths"]]
    if -1 in rows or rows != sorted(rows):
        raise PipelineError("the heatmap files do not follow split.json (unknown or reordered images); "
                            "rerun the model scripts in this output dir")
    if any(split.records[row].label != label or split.splits[row] != name
           for row, label, name in zip(rows, heatmaps["labels"], heatmaps["splits"])):
        raise PipelineError("the heatmap files disagree with split.json on labels or splits; rerun the model scripts")


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


@dataclass(frozen=True)
class Standardizer:
    mean: np.ndarray  # (F,)
    std: np.ndarray  # (F,), >= 1e-6

    @classmethod
    def fit(cls, features: np.ndarray, fit_rows: np.ndarray) -> "Standardizer":
        """Statistics of the fit rows alone: the rows the MLP learns from, never val or test."""
        chosen = features[fit_rows]
        return cls(chosen.mean(axis=0), np.maximum(chosen.std(axis=0), 1e-6))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.std).astype(np.float32)


def build_mlp(in_features: int, hidden_sizes: list[int], dropout: float) -> nn.Sequential:
    """Dense layers, each followed by batch norm, ReLU and dropout; a 2-class linear output."""
    layers, width = [], in_features
    for size in hidden_sizes:
        layers += [nn.Linear(width, size), nn.BatchNorm1d(size), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, 2))
    return nn.Sequential(*layers)


def mlp_from_classifier(classifier: dict) -> nn.Sequential:
    """The MLP a classifier file holds (cancer_class_further.py's or common/cv.py's), in eval mode."""
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
                        "select_balanced_accuracy": metrics["balanced_accuracy"], "select_accuracy": metrics["accuracy"]})
        if best_score is None or score > best_score:
            best_score = score
            best_state = {key: value.detach().clone() for key, value in model.state_dict().items()}
            history[-1]["best_so_far"] = True
    model.load_state_dict(best_state)
    return model, history


@dataclass(frozen=True)
class MlpSettings:
    """The heatmap MLP's settings; the defaults are cancer_class_further.py's."""

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
        """cancer_class_further.py's options."""
        return cls(grid_size=args.grid_size, hidden_sizes=tuple(args.hidden_sizes), dropout=args.dropout,
                   epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                   optimizer=args.optimizer, seed=args.seed)


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
