"""The one loader of a finished run (placeholder of the house move)."""

import json
from pathlib import Path

import numpy as np

from common.cams.heatmap_file import load_heatmaps
from common.core.errors import PipelineError
from common.core.fileio import sha256_of_file
from common.core.runfiles import FURTHER_SCRIPT, RESULTS_JSON, checkpoint_path, heatmap_path
from common.data.partition import SPLIT_FILE_NAME, Split, load_split
from common.models.checkpoints import load_checkpoint
from common.models.registry import ARCHS, MODEL_ORDER
from common.training.config import heatmaps_only_command

# Same images, order, labels and splits, and maps made by the same target-class rule.
ALIGNED_KEYS = ("paths", "labels", "splits", "patients", "magnifications", "target_class_rule")


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
