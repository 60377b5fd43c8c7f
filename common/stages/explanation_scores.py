"""How faithful are a finished run's explanations? Deletion and insertion AUC (common.explain.faithfulness) of every
explanation method of every CNN on a fixed sample of held-out images, against the random and centred-Gaussian
baselines; the combined map against the soft vote; and what the final MLP looks at. The command is
score_explanations.py; it works on both kinds of run.

Held-out images (common.run.Run.held_out): a single split's test images; a K-fold run's every image, each scored
with the models of its own fold, which never saw its patient (the sample's images are grouped by fold, each group
scored with its fold's models, and the per-image scores pooled).

Reads the run's heatmap files (their held-out rows, target-class rule and, for the final MLP, their maps), the
checkpoints (each must be the one that made its maps) and final_classifier.pth. Writes into the run folder (each
file atomically; faithfulness.json last, listing the figures):
    faithfulness/<n>_<image>.png   for the first --figures images: every method of every CNN side by side
    faithfulness.md                the tables, with steps, blur, baselines and the time per image of each method
    faithfulness.json              the same numbers, per image too, and the final MLP's Integrated Gradients shares

* CAMs (Grad-CAM, Grad-CAM++, LayerCAM): on --images held-out images, a seeded sample (--seed).
* LIME, Kernel SHAP, occlusion (captum): hundreds of forward passes per image, so on the first
  --perturbation-images of that sample only, scored with the baselines on the same images.
* Combined map (the three CNNs' display-scaled maps averaged, as the report shows it) against the soft vote's
  probability, every CNN explaining the soft vote's class; only when the CNNs share one input size.
* The final MLP: the share of its decision carried by each CNN's map (and the logits, for that feature set),
  by Integrated Gradients on its input (common.explain.attribution.heatmap_shares), on every held-out image.
"""

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.cams.ensemble import CnnEnsemble
from common.cams.methods import CAM_DISPLAY_NAMES, CAM_METHODS
from common.core.errors import PipelineError
from common.core.fileio import write_json, write_text, written_together
from common.core.runfiles import FAITHFULNESS_DIR, FAITHFULNESS_JSON, FAITHFULNESS_MD, FINAL_CLASSIFIER, checkpoint_path
from common.data.images import load_rgb
from common.data.transforms import build_transforms
from common.explain.attribution import DEFAULT_SAMPLES, heatmap_shares
from common.explain.faithfulness import (
    DEFAULT_STEPS,
    cam_saliency,
    faithfulness_markdown,
    merge_tables,
    score_combined,
    score_methods,
    soft_vote_probabilities,
)
from common.explain.figures import METHOD_DISPLAY_NAMES, PERTURBATION_METHODS, explain_image, perturbation_saliency
from common.fusion.mlp import classifier_features
from common.models.checkpoints import load_checkpoint, model_from_checkpoint
from common.models.registry import ARCHS, MODEL_ORDER
from common.run import HeldOut, Run


@dataclass(frozen=True)
class ScoringOptions:
    """What score_explanations.py scores (its options)."""

    images: int = 100  # held-out images scored (a seeded sample; all if fewer)
    perturbation_images: int = 5  # of those, the first N also by LIME, Kernel SHAP and occlusion
    samples: int = DEFAULT_SAMPLES  # perturbed images drawn by LIME and Kernel SHAP per explanation
    steps: int = DEFAULT_STEPS  # deletion/insertion steps per curve
    figures: int = 3  # images drawn with every method side by side (of the perturbation images)
    seed: int = 0  # seeds the sample, the random baseline and LIME/SHAP


def sample_rows(patients: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A fixed sample of `count` rows (all of them when there are fewer), ordered so that patients take turns:
    the first images (the ones LIME, Kernel SHAP and occlusion explain, and the figures) come from as many
    different patients as there are, not from the first patient in file order."""
    if len(patients) == 0:
        raise PipelineError("the run has no held-out images to score; rerun the model scripts")
    chosen = np.random.default_rng(seed).choice(len(patients), size=min(count, len(patients)), replace=False)
    turn_of, seen = np.empty(len(chosen), dtype=np.int64), {}
    for position, row in enumerate(chosen):  # the k-th drawn image of a patient waits for turn k
        turn_of[position] = seen.get(patients[row], 0)
        seen[patients[row]] = turn_of[position] + 1
    return chosen[np.lexsort((np.arange(len(chosen)), turn_of))]


def fold_cnns(run: Run, fold: int, device: torch.device) -> dict[str, CnnEnsemble]:
    """Fold k's three models (a single split's), each the checkpoint that made the held-out maps (Run.held_out
    checked that), in eval mode on `device`."""
    cnns = {}
    for arch in MODEL_ORDER:
        checkpoint = load_checkpoint(checkpoint_path(run.model_dir(fold), arch), arch)
        cnns[arch] = CnnEnsemble(arch, (model_from_checkpoint(checkpoint).to(device).eval(),),
                                 int(checkpoint["image_size"]), device)
    return cnns


def load_images(root: Path, paths: list[str], image_size: int, device: torch.device) -> torch.Tensor:
    """(N, 3, S, S) normalised, as the model scripts' eval pass makes them."""
    transform = build_transforms(train=False, image_size=image_size)
    return torch.stack([transform(load_rgb(root / path)) for path in paths]).to(device)


def score_cnn(model, arch: str, images: torch.Tensor, args, target: str, perturbation_count: int) -> dict:
    """The CNN's CAMs on every image, its perturbation methods on the first --perturbation-images."""
    probabilities = soft_vote_probabilities([model])  # one model: its own softmax
    cams = {CAM_DISPLAY_NAMES[method]: cam_saliency(model, arch, method=method) for method in CAM_METHODS}
    name = ARCHS[arch].display_name
    tables = {"cams": score_methods(probabilities, images, cams, target=target, steps=args.steps, seed=args.seed,
                                    desc=name)}
    if perturbation_count:
        perturbations = {METHOD_DISPLAY_NAMES[method]: perturbation_saliency(model, method, samples=args.samples,
                                                                             seed=args.seed)
                         for method in PERTURBATION_METHODS}
        tables["perturbation"] = score_methods(probabilities, images[:perturbation_count], perturbations,
                                               target=target, steps=args.steps, seed=args.seed, desc=name)
    return tables


def score_fold(run: Run, fold: int, paths: list[str], perturbation_count: int, args, target: str,
               device: torch.device) -> dict:
    """Every CNN's tables and the combined map's on `paths` (the first `perturbation_count` of them also by the
    perturbation methods), all with fold k's models."""
    cnns = fold_cnns(run, fold, device)
    images = {arch: load_images(run.data_root, paths, ensemble.image_size, device) for arch, ensemble in cnns.items()}
    where = f" (fold {fold})" if run.kind == "kfold" else ""
    if where:
        print(f"fold {fold}: {len(paths)} image(s)", flush=True)
    tables = {arch: score_cnn(ensemble.members[0], arch, images[arch], args, target, perturbation_count)
              for arch, ensemble in cnns.items()}
    same_size = len({ensemble.image_size for ensemble in cnns.values()}) == 1
    tables["combined"] = score_combined([(arch, ensemble.members[0]) for arch, ensemble in cnns.items()],
                                        images[MODEL_ORDER[0]], methods=CAM_METHODS, target=target, steps=args.steps,
                                        seed=args.seed, desc=f"three CNNs{where}") if same_size else None
    return tables


def pooled_tables(per_fold: list[dict]) -> tuple[dict, dict | None]:
    """Each CNN's tables and the combined map's, pooled over the folds' images (merge_tables)."""
    cnns = {}
    for arch in MODEL_ORDER:
        cnns[arch] = {"cams": merge_tables([tables[arch]["cams"] for tables in per_fold])}
        with_perturbation = [tables[arch]["perturbation"] for tables in per_fold if "perturbation" in tables[arch]]
        if with_perturbation:
            cnns[arch]["perturbation"] = merge_tables(with_perturbation)
    combined = None if any(tables["combined"] is None for tables in per_fold) else \
        merge_tables([tables["combined"] for tables in per_fold])
    return cnns, combined


def mlp_shares(run: Run, held: HeldOut) -> dict | None:
    """Integrated Gradients shares of the final MLP's decision per CNN map, on every held-out row; None without a
    classifier."""
    if not (run.output_dir / FINAL_CLASSIFIER).is_file():
        return None
    mlp, classifier = run.load_classifier()
    if classifier["heatmaps_sha256"] != held.heatmaps_sha256:  # the maps it was trained on, not a later export's
        raise PipelineError(f"the heatmap files of {run.output_dir} changed after {FINAL_CLASSIFIER} was fitted; "
                            f"rerun {run.further_command()}")
    cam_method = classifier["cam_method"]
    features = classifier_features(classifier, held.maps[cam_method], held.logits)
    shares = heatmap_shares(mlp, features, grid_size=classifier["grid_size"])
    rows = "out-of-fold image(s), the rows it was fitted on" if run.kind == "kfold" else "test image(s)"
    return {"features": classifier["features"], "cam_method": cam_method, "target": "the MLP's predicted class",
            "rows": rows, "average": {name: float(np.nanmean(value)) for name, value in shares.items()},
            "per_image": {"paths": [str(path) for path in held.paths],
                          **{name: [float(share) for share in value] for name, value in shares.items()}}}


def write_figures(run: Run, held: HeldOut, rows: np.ndarray, args, device: torch.device) -> list[str]:
    """faithfulness/<n>_<image>.png: each image explained by every method of every CNN (of its fold); returns the
    names relative to the run folder."""
    names = []
    for rank, row in enumerate(rows, start=1):
        path = str(held.paths[row])
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(path).stem)  # safe in a file name and a URL
        target = run.output_dir / FAITHFULNESS_DIR / f"{rank:02d}_{stem}.png"
        title = path + (f" (fold {held.folds[row]}'s models)" if run.kind == "kfold" else "")
        explain_image(run.data_root / path, fold_cnns(run, int(held.folds[row]), device), target,
                      target_rule=held.target_class_rule, samples=args.samples, seed=args.seed, title=title)
        names.append(f"{FAITHFULNESS_DIR}/{target.name}")
    return names


def faithfulness_report_markdown(result: dict) -> str:
    """faithfulness.md: one block per CNN, the combined map, the final MLP's shares."""
    parts = [f"# Faithfulness of the explanations of {result['output_dir']}", "",
             f"Deletion and insertion AUC (Petsiuk et al. 2018) on {len(result['images'])} held-out image(s) "
             f"({result['held_out']}), a sample drawn with seed {result['seed']}; LIME, Kernel SHAP and occlusion on "
             "the first "
             f"{result['perturbation_images']} of them ({result['samples']} samples each for LIME and Kernel SHAP, "
             "a patch off = its blurred copy). Map ms / image: the time to make one image's map on "
             f"{result['device']}."]
    parts += [f"> Caveat: {line}" for line in result["caveats"]]
    for arch, tables in result["cnns"].items():
        parts += ["", f"## {ARCHS[arch].display_name}: its own probability of its target class", "",
                  faithfulness_markdown(tables["cams"])]
        if "perturbation" in tables:
            parts += ["", f"Perturbation methods, first {tables['perturbation']['images']} image(s):", "",
                      faithfulness_markdown(tables["perturbation"])]
    parts += ["", "## Combined map (mean of the three CNNs' display-scaled maps) against the soft vote", ""]
    parts.append(faithfulness_markdown(result["combined"]) if result["combined"] else
                 "Not scored: the CNNs take different input sizes, so there is no one image to perturb.")
    shares = result["mlp_shares"]
    parts += ["", "## What the final MLP looks at", ""]
    if shares is None:
        parts.append(f"No {FINAL_CLASSIFIER} in the run.")
    else:
        names = list(shares["average"])
        parts += ["| " + " | ".join(ARCHS[name].display_name if name in ARCHS else name for name in names) + " |",
                  "|" + " ---: |" * len(names),
                  "| " + " | ".join(f"{shares['average'][name]:.3f}" for name in names) + " |", "",
                  f"Share of the MLP's decision (on {shares['features']}, {CAM_DISPLAY_NAMES[shares['cam_method']]} "
                  f"maps) carried by each input group: sum of |Integrated Gradients| of the group / total, baseline "
                  f"the mean feature of its fit rows, target {shares['target']}; mean over "
                  f"{len(shares['per_image']['paths'])} {shares['rows']}."]
    return "\n".join(parts) + "\n"


def score_explanations(run: Run, args: ScoringOptions, device: torch.device) -> dict:
    """Score the run's explanations and write faithfulness.md, faithfulness.json and the figures; returns the
    JSON's contents."""
    held = run.held_out()
    sample = sample_rows(held.patients, args.images, args.seed)
    perturbation_count = min(args.perturbation_images, len(sample))
    started = time.perf_counter()
    per_fold, scored_paths = [], []
    for fold in sorted(set(held.folds[sample].tolist())):
        in_fold = [position for position, row in enumerate(sample) if held.folds[row] == fold]
        paths = [str(held.paths[sample[position]]) for position in in_fold]
        perturbed = sum(position < perturbation_count for position in in_fold)
        # The fold's perturbation images first: score_cnn takes them from the front.
        order = sorted(range(len(in_fold)), key=lambda index: in_fold[index] >= perturbation_count)
        paths = [paths[index] for index in order]
        per_fold.append(score_fold(run, fold, paths, perturbed, args, held.target_class_rule, device))
        scored_paths += paths
    cnns, combined = pooled_tables(per_fold)
    figures = write_figures(run, held, sample[:min(args.figures, perturbation_count)], args, device)
    result = {"output_dir": str(run.output_dir), "run_kind": run.kind, "held_out": held_out_words(run),
              "images": scored_paths, "seed": args.seed, "steps": args.steps,
              "perturbation_images": perturbation_count, "samples": args.samples, "device": str(device),
              "caveats": run.caveats(), "target_class_rule": held.target_class_rule, "cnns": cnns,
              "combined": combined, "mlp_shares": mlp_shares(run, held), "figures": figures,
              "checkpoint_sha256": held.checkpoint_sha256, "seconds": time.perf_counter() - started}
    # Both files or neither (the earlier pair stays on a failure); the report reads the figures the JSON lists.
    targets = [run.output_dir / FAITHFULNESS_MD, run.output_dir / FAITHFULNESS_JSON]
    with written_together(targets) as (markdown, table):
        write_text(markdown, faithfulness_report_markdown(result))
        write_json(table, result)
    return result


def held_out_words(run: Run) -> str:
    return ("out of fold: each image scored with the models of its own fold, which never saw its patient"
            if run.kind == "kfold" else "the test split")
