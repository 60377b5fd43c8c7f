"""The one loader of a run folder, whatever its kind. Every reader sees a run through it: predict.py, the viewer,
the report, score_explanations.py and cancer_class_further.py.

    run = open_run(output_dir)            # its kind ('single' or 'kfold') and partition (split.json or folds.json)
    run.folds, run.model_dir(k)           # 1..K (a single split: 1) and fold k's folder (a single split: the run's)
    run.fold_heatmaps(k)                  # fold k's three heatmap files: aligned, following its split, made by the
                                          # checkpoints beside them
    run.held_out()                        # the images the run's numbers are about, each with the logits and maps of
                                          # the model that never saw its patient: a single split's test images, a
                                          # K-fold run's every image (out of fold)
    run.results(), run.predictions()      # results.json / cv_results.json; every held-out image's P(malignant)
    run.load_classifier()                 # final_classifier.pth: one schema for both kinds, checked
    run.load_cnns(device, classifier)     # each CNN as a CnnEnsemble of its fold models, each the very checkpoint
                                          # the classifier was fitted on (fold by fold)
    run.caveats()                         # why the models say nothing about real tissue

A fold of a K-fold run is itself a single-split run (fold_<k>/ has a split.json whose test side is fold k), so
open_run(run / "fold_2") works too. Every check ends in a one-line error that names the file and the command that
makes or remakes it.
"""

import contextlib
import csv
import filecmp
import json
import shlex
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.cams.ensemble import CnnEnsemble
from common.cams.heatmap_file import CAM_ARRAY_KEYS, load_heatmaps, stored_cam_methods
from common.cams.methods import CAM_METHODS
from common.core.errors import PipelineError
from common.core.fileio import sha256_of_file
from common.core.runfiles import (
    CV_RESULTS_JSON,
    FINAL_CLASSIFIER,
    FOLDS_FILE,
    FURTHER_SCRIPT,
    OOF_PREDICTIONS,
    PIPELINE_SCRIPT,
    RESULTS_JSON,
    SPLIT_FILE,
    TEST_PREDICTIONS,
    checkpoint_path,
    fold_dir,
    heatmap_path,
    run_kind,
)
from common.data.partition import (
    Folds,
    Split,
    indexed_records,
    load_folds,
    load_split,
    make_folds,
    prepare_fold_split,
    prepare_folds,
    save_partition,
)
from common.data.records import CLASS_NAMES
from common.fusion.mlp import CLASSIFIER_FORMAT_VERSION, mlp_from_classifier
from common.models.checkpoints import load_checkpoint, model_from_checkpoint, training_caveats
from common.models.registry import ARCHS, MODEL_ORDER
from common.training.config import DEFAULTS as TRAINING_DEFAULTS
from common.training.config import TrainConfig, changed_training_options, fold_protocol, heatmaps_only_command

# Same images, order, labels and splits, and maps made by the same target-class rule, in all three heatmap files.
ALIGNED_KEYS = ("paths", "labels", "splits", "patients", "magnifications", "target_class_rule", "split_digest")


@dataclass(frozen=True)
class HeldOut:
    """The images a run's numbers are about, in the order of its predictions file, each with what the model that
    never saw its patient made of it (a single split: the test images; K-fold: every image, out of fold)."""

    paths: np.ndarray  # (N,) str, relative to the run's data root
    labels: np.ndarray  # (N,) int64
    patients: np.ndarray  # (N,) str
    magnifications: np.ndarray  # (N,) str
    subtypes: np.ndarray  # (N,) str
    folds: np.ndarray  # (N,) int64: the fold whose models scored the row (1..K; a single split: 1)
    logits: dict[str, np.ndarray]  # arch -> (N, 2)
    maps: dict[str, dict[str, np.ndarray]]  # CAM method -> arch -> (N, h, w) raw maps; the methods every file holds
    target_class_rule: str  # the rule every map was made with
    image_sizes: dict[str, int]  # arch -> the input size its maps were made at
    checkpoint_sha256: dict[str, list[str]]  # arch -> per fold (index k - 1): the checkpoint that made the rows
    heatmaps_sha256: dict[str, list[str]]  # arch -> per fold: the heatmap file the rows come from


@dataclass(frozen=True)
class Run:
    output_dir: Path
    kind: str  # 'single' or 'kfold'
    partition: Split | Folds

    # ------------------------------------------------------------------------------------ layout

    @property
    def folds(self) -> range:
        return range(1, (self.partition.n_folds if self.kind == "kfold" else 1) + 1)

    def model_dir(self, fold: int = 1) -> Path:
        """Where fold k's checkpoints and heatmap files are: fold_<k>/ of a K-fold run, a single split's folder."""
        return fold_dir(self.output_dir, fold) if self.kind == "kfold" else self.output_dir

    @property
    def data_root(self) -> Path:
        return self.partition.root

    @property
    def results_file(self) -> Path:
        return self.output_dir / (CV_RESULTS_JSON if self.kind == "kfold" else RESULTS_JSON)

    @property
    def predictions_file(self) -> Path:
        return self.output_dir / (OOF_PREDICTIONS if self.kind == "kfold" else TEST_PREDICTIONS)

    def further_command(self) -> str:
        return f"python {FURTHER_SCRIPT} --output-dir {self.output_dir}"

    def model_command(self, arch: str, fold: int) -> str:
        """The command that trains `arch` (in fold k) into this run, with the options its split or folds were made
        with (the split file refuses other ones)."""
        protocol = self.partition.protocol
        words = ["python", ARCHS[arch].script, "--data-dir", str(self.data_root), "--output-dir", str(self.output_dir)]
        if self.kind == "kfold":
            words += [arg for path in protocol["fold_files"] for arg in ("--fold-file", path)] \
                if protocol["method"] == "fold_files" else ["--folds", str(self.partition.n_folds)]
            words += ["--fold", str(fold)]
        else:
            if protocol["method"] == "fold":
                words += ["--fold-file", protocol["fold_file"]]
            elif protocol["method"] == "image":
                words += ["--split", "image"]
            if protocol.get("test_fraction") not in (None, TRAINING_DEFAULTS["test_fraction"]):
                words += ["--test-fraction", str(protocol["test_fraction"])]
        for option in ("val_fraction", "seed", "magnification", "patient_id"):
            if option in protocol and protocol[option] != TRAINING_DEFAULTS[option]:
                words += [f"--{option.replace('_', '-')}", str(protocol[option])]
        return shlex.join(words)

    def first_missing(self) -> str | None:
        """What to run next when a stage has not run: the first missing checkpoint or heatmap file, or the final
        stage's results; None when every file the readers need is there."""
        for fold in self.folds:
            for arch in MODEL_ORDER:
                for path in (checkpoint_path(self.model_dir(fold), arch), heatmap_path(self.model_dir(fold), arch)):
                    if not path.is_file():
                        return f"{path} is missing: run {self.model_command(arch, fold)}"
        if not self.results_file.is_file():
            return f"{self.results_file} is missing: run {self.further_command()}"
        return None

    def require(self, path: Path) -> Path:
        """`path`, or a one-line error saying what to run first (the run's first missing stage)."""
        if Path(path).is_file():
            return Path(path)
        missing = self.first_missing()
        raise PipelineError(missing if missing else f"{path} is missing: run {self.further_command()}")

    # ------------------------------------------------------------------------------------ the run's own images

    @cached_property
    def _rows_by_path(self) -> dict[str, int]:
        return {record.path: row for row, record in enumerate(self.partition.records)}

    @cached_property
    def _rows_by_size(self) -> dict[int, list[int]]:
        """File size -> rows of the partition (a stat per image: a new file is compared only with same-size ones)."""
        rows = {}
        for row, record in enumerate(self.partition.records):
            with contextlib.suppress(OSError):  # an image gone from the data root cannot be matched
                rows.setdefault((self.data_root / record.path).stat().st_size, []).append(row)
        return rows

    def own_image_row(self, path: Path) -> int | None:
        """The partition row that `path` is one of the run's own images: the file under the data root, or a file
        with the same bytes (a copy, a viewer upload); None for a new image."""
        path = Path(path)
        with contextlib.suppress(ValueError):
            row = self._rows_by_path.get(path.resolve().relative_to(self.data_root.resolve()).as_posix())
            if row is not None:
                return row
        candidates = self._rows_by_size.get(path.stat().st_size, [])
        return next((row for row in candidates
                     if filecmp.cmp(path, self.data_root / self.partition.records[row].path, shallow=False)), None)

    def own_image_note(self, row: int) -> str:
        """What a reader must know about an input that is one of the run's own images (row of the partition)."""
        record = self.partition.records[row]
        if self.kind == "kfold":
            fold = int(self.partition.folds[row])
            return (f"one of this run's own images (patient {record.patient}, fold {fold}): the models of the other "
                    f"folds were trained on it; only fold {fold}'s models never saw its patient")
        side = self.partition.splits[row]
        if side == "test":
            return f"one of this run's own test images (patient {record.patient}): already scored in its table"
        return (f"one of this run's own {side} images (patient {record.patient}): the models have seen it, so its "
                "probabilities are not an evaluation")

    # ------------------------------------------------------------------------------------ per fold

    def fold_split(self, fold: int = 1) -> Split:
        """Fold k's split (a single split: the run's), checked to be made from this run's folds."""
        if self.kind == "single":
            return self.partition
        split = load_split(self.require(self.model_dir(fold) / SPLIT_FILE))
        if split.protocol.get("folds_digest") != self.partition.digest or split.protocol.get("fold") != fold:
            raise PipelineError(f"{self.model_dir(fold) / SPLIT_FILE} was made from other folds than "
                                f"{self.output_dir / FOLDS_FILE}; delete {self.model_dir(fold)} and rerun fold {fold}")
        return Split(self.data_root, split.records, split.splits, split.protocol, split.digest)

    def fold_heatmaps(self, fold: int = 1, heatmap_files: dict[str, Path] | None = None
                      ) -> tuple[dict[str, dict], dict[str, str]]:
        """Fold k's three heatmap files (or `heatmap_files`), checked to be aligned, to follow the fold's split,
        and to be made by the checkpoints beside them; also those checkpoints' SHA-256 (hashed once here)."""
        folder = self.model_dir(fold)
        files = heatmap_files or {arch: heatmap_path(folder, arch) for arch in MODEL_ORDER}
        heatmaps = {arch: load_heatmaps(self.require(files[arch])) for arch in MODEL_ORDER}
        check_aligned(heatmaps, files)
        check_against_split(heatmaps[MODEL_ORDER[0]], self.fold_split(fold), folder)
        digests = {}
        for arch in MODEL_ORDER:
            checkpoint_file = self.require(checkpoint_path(folder, arch))
            self.check_fold_of(load_checkpoint(checkpoint_file, arch), checkpoint_file, fold)  # truncated: an error
            digests[arch] = sha256_of_file(checkpoint_file)
            check_made_by_checkpoint(arch, files[arch], heatmaps[arch], checkpoint_file, digests[arch],
                                     then=self.further_command())
        return heatmaps, digests

    # ------------------------------------------------------------------------------------ held-out rows

    def held_out(self) -> HeldOut:
        """Every held-out image once, with its fold's logits and maps (checked: K-fold test sides cover the folds
        file exactly once)."""
        records = self.partition.records
        row_of = {record.path: index for index, record in enumerate(records)}
        parts = []
        for fold in self.folds:
            heatmaps, checkpoint_digests = self.fold_heatmaps(fold)
            test = heatmaps[MODEL_ORDER[0]]["splits"] == "test"
            rows = np.array([row_of[path] for path in heatmaps[MODEL_ORDER[0]]["paths"][test]], dtype=np.int64)
            if self.kind == "kfold" and np.any(self.partition.folds[rows] != fold):
                raise PipelineError(f"{self.model_dir(fold)}: its test images are not fold {fold}'s patients")
            parts.append((fold, rows, test, heatmaps, checkpoint_digests))
        rows = np.concatenate([part[1] for part in parts])
        if self.kind == "kfold" and (len(rows) != len(records) or len(np.unique(rows)) != len(records)):
            raise PipelineError(f"the folds' test sets do not cover {self.output_dir / FOLDS_FILE} once each; "
                                "rerun the folds")
        order = np.argsort(rows, kind="stable")  # K-fold: the folds file's order; a single split: the split's
        rules = {str(part[3][MODEL_ORDER[0]]["target_class_rule"]) for part in parts}
        if len(rules) > 1:
            raise PipelineError(f"the folds' maps were made with different --cam-target rules ({sorted(rules)}); "
                                "rerun the folds with one rule")
        methods = [method for method in CAM_METHODS
                   if all(method in stored_cam_methods(part[3][arch]) for part in parts for arch in MODEL_ORDER)]

        def gathered(key: str, arch: str) -> np.ndarray:
            values = [part[3][arch][key][part[2]] for part in parts]
            if len({value.shape[1:] for value in values}) > 1:
                raise PipelineError(f"the folds' {arch} maps have different sizes: run every fold at one --image-size")
            return np.concatenate(values)[order]

        chosen = [records[index] for index in rows[order]]
        return HeldOut(
            paths=np.array([record.path for record in chosen]), labels=np.array([r.label for r in chosen], np.int64),
            patients=np.array([r.patient for r in chosen]), magnifications=np.array([r.magnification for r in chosen]),
            subtypes=np.array([r.subtype for r in chosen]),
            folds=np.concatenate([np.full(len(part[1]), part[0], np.int64) for part in parts])[order],
            logits={arch: gathered("logits", arch) for arch in MODEL_ORDER},
            maps={method: {arch: gathered(CAM_ARRAY_KEYS[method], arch) for arch in MODEL_ORDER} for method in methods},
            target_class_rule=rules.pop(),
            image_sizes={arch: int(parts[0][3][arch]["image_size"]) for arch in MODEL_ORDER},
            checkpoint_sha256={arch: [part[4][arch] for part in parts] for arch in MODEL_ORDER},
            heatmaps_sha256={arch: [sha256_of_file(heatmap_path(self.model_dir(part[0]), arch)) for part in parts]
                             for arch in MODEL_ORDER})

    # ------------------------------------------------------------------------------------ the final stage's files

    def results(self) -> dict:
        """results.json (single split) or cv_results.json (K-fold), or an error naming what to run first."""
        path = self.require(self.results_file)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise PipelineError(f"{path} is unreadable ({error}); rerun {self.further_command()}") from None

    def check_listed(self, path: Path, results: dict | None = None) -> Path:
        """`path` must be the very file the results list (same SHA-256): a run stopped between its renames, or
        files of two runs, would pair a classifier or predictions with another run's results."""
        results = self.results() if results is None else results
        listed = results.get("outputs", {}).get(Path(path).name)
        if listed is None or listed != sha256_of_file(self.require(path)):
            reason = "is not the file it lists" if listed else "lists no such file"
            raise PipelineError(f"{path} does not belong to the {self.results_file.name} beside it "
                                f"({self.results_file.name} {reason}); rerun {self.further_command()}")
        return Path(path)

    def predictions(self) -> dict[str, np.ndarray]:
        """Every held-out image's stored P(malignant) of every table row: paths, labels, patients, magnifications,
        folds and prob_<row key> arrays, in the order of held_out()."""
        path = self.check_listed(self.predictions_file)
        if self.kind == "single":
            try:
                with np.load(path, allow_pickle=False) as content:
                    predictions = {key: content[key] for key in content.files}
            except Exception as error:  # a truncated zip, a pickled array: all mean "rerun the stage"
                raise PipelineError(f"{path} is unreadable ({type(error).__name__}); rerun "
                                    f"{self.further_command()}") from None
            return {**predictions, "folds": np.ones(len(predictions["labels"]), np.int64)}
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        columns = {key: np.array([row[key] for row in rows]) for key in (rows[0] if rows else {})}
        return {**columns, "labels": np.array([CLASS_NAMES.index(label) for label in columns["label"]], np.int64),
                "patients": columns["patient"], "magnifications": columns["magnification"],
                "paths": columns["path"], "folds": columns["fold"].astype(np.int64),
                **{key: values.astype(np.float64) for key, values in columns.items() if key.startswith("prob_")}}

    def load_classifier(self) -> tuple[nn.Module, dict]:
        """final_classifier.pth and its MLP (eval mode), checked: listed by the results, this schema, this run."""
        path = self.check_listed(self.output_dir / FINAL_CLASSIFIER)
        classifier = load_checkpoint(path, made_by=self.further_command())
        if classifier.get("format_version") != CLASSIFIER_FORMAT_VERSION:
            raise PipelineError(f"{path} was written by an earlier version of the pipeline (format "
                                f"{classifier.get('format_version')}, this version reads {CLASSIFIER_FORMAT_VERSION}); "
                                f"rewrite it with {self.further_command()}")
        if classifier["run_kind"] != self.kind or classifier["partition_digest"] != self.partition.digest:
            raise PipelineError(f"{path} was fitted on another run than the one in {self.output_dir}; rewrite it "
                                f"with {self.further_command()}")
        return mlp_from_classifier(classifier), classifier

    # ------------------------------------------------------------------------------------ models

    def checked_checkpoint(self, arch: str, fold: int, classifier: dict) -> Path:
        """Fold k's checkpoint of `arch`, checked to be the very one the classifier was fitted on (fold by fold:
        a checkpoint copied from another fold is refused)."""
        folder = self.model_dir(fold)
        path = self.require(checkpoint_path(folder, arch))
        digest = sha256_of_file(path)
        if digest == classifier["checkpoint_sha256"][arch][fold - 1]:
            return path
        self.check_fold_of(load_checkpoint(path, arch), path, fold)
        heatmap_file = heatmap_path(folder, arch)
        if heatmap_file.is_file():  # a model script rerun that stopped before its export: regenerate the maps first
            check_made_by_checkpoint(arch, heatmap_file, load_heatmaps(heatmap_file), path, digest,
                                     then=self.further_command())
        where = f" for fold {fold}" if self.kind == "kfold" else ""
        raise PipelineError(f"{path} is not the checkpoint {FINAL_CLASSIFIER} was fitted on{where} (it was retrained "
                            f"since); rerun {self.further_command()}")

    def check_fold_of(self, checkpoint: dict, path: Path, fold: int) -> None:
        """A K-fold run's checkpoint must be its folder's fold's (its config records the fold it was trained for):
        one copied from another fold trained on this fold's test patients."""
        trained_for = checkpoint.get("config", {}).get("fold")
        if self.kind == "kfold" and trained_for != fold:
            raise PipelineError(f"{path} was trained for fold {trained_for}, not fold {fold} (copied from another "
                                f"fold?): it has seen fold {fold}'s test patients; retrain it with "
                                f"{self.model_command(checkpoint['arch'], fold)}")

    def load_cnns(self, device: torch.device, classifier: dict, folds=None, *,
                  one_at_a_time: bool = False) -> dict[str, CnnEnsemble]:
        """Each CNN as the ensemble of its models of `folds` (default: every fold), on `device`, each checked to be
        the checkpoint the classifier was fitted on. one_at_a_time: the members are loaded only while they run
        (memory for one fold model instead of K; see CnnEnsemble); the check is made here, once."""
        ensembles = {}
        for arch in MODEL_ORDER:
            members, sizes = [], set()
            for fold in folds or self.folds:
                path = self.checked_checkpoint(arch, fold, classifier)
                checkpoint = load_checkpoint(path, arch)  # memory-mapped: only what is read is loaded
                sizes.add(int(checkpoint["image_size"]))
                members.append(partial(_load_model, path, arch, device) if one_at_a_time
                               else model_from_checkpoint(checkpoint).to(device).eval())
                del checkpoint
            if len(sizes) > 1:
                raise PipelineError(f"the folds' {arch} checkpoints were trained at different --image-size "
                                    f"({sorted(sizes)}); retrain the folds at one size")
            ensembles[arch] = CnnEnsemble(arch, tuple(members), sizes.pop(), device)
        return ensembles

    def caveats(self) -> list[str]:
        """training_caveats of every checkpoint of the run (read lazily: memory-mapped); a run copied without its
        checkpoints gets none."""
        checkpoints = {ARCHS[arch].display_name: [load_checkpoint(checkpoint_path(self.model_dir(fold), arch), arch)
                                                  for fold in self.folds
                                                  if checkpoint_path(self.model_dir(fold), arch).is_file()]
                       for arch in MODEL_ORDER}
        return training_caveats(checkpoints)


def _load_model(path: Path, arch: str, device: torch.device) -> nn.Module:
    return model_from_checkpoint(load_checkpoint(path, arch)).to(device).eval()


def open_run(output_dir: str | Path) -> Run:
    """The run in `output_dir`, its kind and partition; a one-line error when the folder holds no run."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise PipelineError(f"--output-dir {output_dir} does not exist; make a run there first with python "
                            f"{PIPELINE_SCRIPT} --data-dir DATA --output-dir {output_dir} (or --demo)")
    kind = run_kind(output_dir)
    if kind is None:
        raise PipelineError(f"--output-dir {output_dir} holds no run (neither {SPLIT_FILE} nor {FOLDS_FILE}); make "
                            f"one there with python {PIPELINE_SCRIPT} --data-dir DATA --output-dir {output_dir} "
                            "(or the model scripts)")
    partition = load_folds(output_dir / FOLDS_FILE) if kind == "kfold" else load_split(output_dir / SPLIT_FILE)
    return Run(output_dir, kind, partition)


# ---------------------------------------------------------------------------------------- checks of the files


def check_aligned(heatmaps: dict[str, dict], files: dict[str, Path]) -> None:
    """The three heatmap files describe the same images in the same order, labels and splits."""
    reference_arch = MODEL_ORDER[0]
    reference = heatmaps[reference_arch]
    for arch in MODEL_ORDER:
        if str(heatmaps[arch]["arch"]) != arch:
            raise PipelineError(f"{files[arch]} holds heatmaps of {heatmaps[arch]['arch']}, not {arch}")
    for arch in MODEL_ORDER[1:]:
        for key in ALIGNED_KEYS:
            ours, theirs = heatmaps[arch][key], reference[key]
            if ours.shape != theirs.shape:
                raise PipelineError(f"{files[arch]} has {len(ours)} rows, {files[reference_arch]} has {len(theirs)}: "
                                    "rerun the model scripts with the same --output-dir and --max-images")
            if not np.array_equal(ours, theirs):
                row = int(np.flatnonzero(np.atleast_1d(ours != theirs))[0]) if ours.ndim else 0
                raise PipelineError(
                    f"{files[arch]} and {files[reference_arch]} differ in '{key}' (first at row {row}: "
                    f"{np.atleast_1d(ours)[row]!r} vs {np.atleast_1d(theirs)[row]!r}); rerun the model scripts "
                    "on one split (same --output-dir)")


def check_against_split(heatmaps: dict, split: Split, folder: Path) -> None:
    """Every heatmap row is a row of the split with the same label and side, in the split file's order."""
    row_of = {record.path: index for index, record in enumerate(split.records)}
    rows = [row_of.get(path, -1) for path in heatmaps["paths"]]
    if -1 in rows or rows != sorted(rows) or str(heatmaps["split_digest"]) != split.digest:
        raise PipelineError(f"the heatmap files in {folder} do not follow its {SPLIT_FILE} (another split, or unknown "
                            "or reordered images); rerun the model scripts there")
    if any(split.records[row].label != label or split.splits[row] != name
           for row, label, name in zip(rows, heatmaps["labels"], heatmaps["splits"])):
        raise PipelineError(f"the heatmap files in {folder} disagree with its {SPLIT_FILE} on labels or splits; rerun "
                            "the model scripts there")


def check_made_by_checkpoint(arch: str, heatmap_file: Path, heatmaps: dict, checkpoint_file: Path,
                             checkpoint_sha256: str, *, then: str | None = None) -> None:
    """Refuse maps made by another checkpoint than the one beside them: a model script rerun that wrote its new
    checkpoint and then stopped (a failed export, a full disk) leaves the old maps next to the new model.
    `then`: a command to run after regenerating them (for readers of the final stage's results)."""
    if str(heatmaps["checkpoint_sha256"]) == checkpoint_sha256:
        return
    output_dir = Path(checkpoint_file).parent  # where --heatmaps-only reads the checkpoint and writes the maps
    command = heatmaps_only_command(ARCHS[arch].script, load_checkpoint(checkpoint_file, arch)["config"], output_dir)
    raise PipelineError(f"{heatmap_file} is stale: it was made by another checkpoint than {checkpoint_file} (a rerun "
                        f"of {ARCHS[arch].script} that stopped before its heatmap export finished?); regenerate it "
                        f"with {command}{f', then {then}' if then else ''}")


def model_complete(folder: Path, arch: str) -> bool:
    """Whether a model of a run has finished: its checkpoint loads, and its heatmap file was made by that
    checkpoint on the folder's split. A run stopped midway leaves this False, so run_pipeline.py redoes it."""
    checkpoint_file, heatmap_file = checkpoint_path(folder, arch), heatmap_path(folder, arch)
    if not (checkpoint_file.is_file() and heatmap_file.is_file() and (folder / SPLIT_FILE).is_file()):
        return False
    try:
        heatmaps = load_heatmaps(heatmap_file)
        load_checkpoint(checkpoint_file, arch)
        check_made_by_checkpoint(arch, heatmap_file, heatmaps, checkpoint_file, sha256_of_file(checkpoint_file))
        return str(heatmaps["split_digest"]) == load_split(folder / SPLIT_FILE).digest
    except PipelineError:
        return False


def finished_fold_models(output_dir: Path, requests: list[TrainConfig]) -> set[tuple[int, str]]:
    """(fold, arch) of every requested fold model that a resumed K-fold run may skip: complete, and trained on the
    requested data and folds with the requested options. Anything else that stands in the way is refused up front,
    in one line, before any training: data other than folds.json was made from, fold folders made from other folds
    (folds.json deleted and remade from other data), a finished model trained with other options."""
    output_dir = Path(output_dir)
    first = requests[0]
    folds_file, protocol = output_dir / FOLDS_FILE, fold_protocol(first)
    remade = not folds_file.exists()
    if remade:  # saved only once the fold folders already there are found to agree with them
        root, records = indexed_records(first.data_dir, protocol)
        folds = make_folds(records, root, protocol)
    else:
        folds = prepare_folds(first.data_dir, folds_file, protocol)  # the data and the fold options checked
    trained = sorted(path for path in output_dir.glob("fold_*") if (path / SPLIT_FILE).is_file())
    for folder in trained:
        fold = folder.name.removeprefix("fold_")
        try:
            prepare_fold_split(folds, int(fold), folder / SPLIT_FILE)
        except (PipelineError, ValueError):
            models = sum(checkpoint_path(path, arch).is_file() for path in trained for arch in ARCHS)
            cause = (f"{folds_file} was missing and the folds remade from {first.data_dir} with these options"
                     if remade else f"the folds in {folds_file}")
            raise PipelineError(f"{folder} was trained on other folds than {cause}; delete {output_dir}/fold_*/ as "
                                f"well to train every fold again ({models} trained model(s) there are lost), or "
                                "use another --output-dir") from None
    if remade:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_partition(folds_file, folds)
    finished = set()
    for config in requests:
        folder = Path(config.output_dir)
        if not model_complete(folder, config.arch):
            continue
        checkpoint_file = checkpoint_path(folder, config.arch)
        changed = changed_training_options(load_checkpoint(checkpoint_file, config.arch)["config"], config)
        if changed:
            raise PipelineError(f"{checkpoint_file} was trained with other options ({'; '.join(changed)}); pass the "
                                f"options it was trained with to resume this run, or use another --output-dir (or "
                                f"delete {output_dir}/fold_*/ to train every fold again, losing its models)")
        finished.add((config.fold, config.arch))
    return finished
