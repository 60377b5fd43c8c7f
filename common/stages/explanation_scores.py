"""How faithful are a finished run's explanations? Deletion and insertion AUC (common.explain.faithfulness) of every
explanation method of every CNN on a fixed sample of test images, against the random and centred-Gaussian
baselines; the combined map against the soft vote; and what the final MLP looks at.

    python score_explanations.py --output-dir runs/breakhis [--images 100 --steps 16 --seed 0]

Reads from --output-dir: split.json, the three heatmap files (their test rows, target-class rule and, for the
final MLP, their maps), the three checkpoints (each must be the one that made its maps) and final_classifier.pth.
Writes (each file atomically; faithfulness.json last, listing the figures):
    faithfulness/<n>_<image>.png   for the first --figures images: every method of every CNN side by side
    faithfulness.md                the tables, with steps, blur, baselines and the time per image of each method
    faithfulness.json              the same numbers, per image too, and the final MLP's Integrated Gradients shares

* CAMs (Grad-CAM, Grad-CAM++, LayerCAM): on --images test images, a seeded sample (--seed).
* LIME, Kernel SHAP, occlusion (captum): hundreds of forward passes per image, so on the first
  --perturbation-images of that sample only, scored with the baselines on the same images.
* Combined map (the three CNNs' display-scaled maps averaged, as the report shows it) against the soft vote's
  probability, every CNN explaining the soft vote's class; only when the CNNs share one input size.
* The final MLP: the share of its decision carried by each CNN's map (and the logits, for that feature set),
  by Integrated Gradients on its input (common.explain.attribution.heatmap_shares), on every test image.
"""

import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch

from common.cams.heatmap_file import stored_cams
from common.cams.methods import CAM_DISPLAY_NAMES, CAM_METHODS
from common.core.console import HelpFormatter
from common.core.errors import PipelineError
from common.core.fileio import sha256_of_file, write_json, write_text, written_together
from common.core.runfiles import (
    FAITHFULNESS_DIR,
    FAITHFULNESS_JSON,
    FAITHFULNESS_MD,
    FINAL_CLASSIFIER,
    FURTHER_SCRIPT,
    checkpoint_path,
    heatmap_path,
)
from common.data.images import load_rgb
from common.data.partition import SPLIT_FILE_NAME, load_split
from common.data.transforms import build_transforms
from common.explain.attribution import DEFAULT_SAMPLES, heatmap_shares
from common.explain.faithfulness import (
    DEFAULT_STEPS,
    cam_saliency,
    faithfulness_markdown,
    score_combined,
    score_methods,
    soft_vote_probabilities,
)
from common.explain.figures import METHOD_DISPLAY_NAMES, PERTURBATION_METHODS, explain_image, perturbation_saliency
from common.fusion.mlp import classifier_features
from common.inference import load_classifier
from common.models.checkpoints import load_checkpoint, model_from_checkpoint, training_caveats
from common.models.registry import ARCHS, MODEL_ORDER
from common.run import check_checkpoints, load_run_heatmaps
from common.training.runtime import pick_device


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python score_explanations.py", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--output-dir", default="runs/breakhis", help="a finished run (the four scripts' output dir)")
    parser.add_argument("--images", type=int, default=100, help="test images scored (a seeded sample; all if fewer)")
    parser.add_argument("--perturbation-images", type=int, default=5,
                        help="of those, the first N also explained by LIME, Kernel SHAP and occlusion (0: none)")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help="perturbed images drawn by LIME and Kernel SHAP per explanation")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="deletion/insertion steps per curve")
    parser.add_argument("--figures", type=int, default=3,
                        help="images drawn with every method side by side (of the perturbation images)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sample, the random baseline and LIME/SHAP")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                        help="auto: CUDA if present, else MPS, else the CPU")
    args = parser.parse_args(argv)
    if min(args.images, args.steps, args.samples) < 1 or min(args.perturbation_images, args.figures) < 0:
        parser.error("--images, --steps and --samples must be at least 1, --perturbation-images and --figures "
                     "not negative")
    return args


def sample_test_rows(splits: np.ndarray, patients: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A fixed sample of `count` test rows (all of them when there are fewer), ordered so that patients take turns:
    the first images (the ones LIME, Kernel SHAP and occlusion explain, and the figures) come from as many
    different patients as there are, not from the first patient in file order."""
    test_rows = np.flatnonzero(splits == "test")
    if len(test_rows) == 0:
        raise PipelineError("the heatmap files have no test rows to score; rerun the model scripts")
    chosen = np.random.default_rng(seed).choice(test_rows, size=min(count, len(test_rows)), replace=False)
    turn_of, seen = np.empty(len(chosen), dtype=np.int64), {}
    for position, row in enumerate(chosen):  # the k-th drawn image of a patient waits for turn k
        turn_of[position] = seen.get(patients[row], 0)
        seen[patients[row]] = turn_of[position] + 1
    return chosen[np.lexsort((np.arange(len(chosen)), turn_of))]


def load_models(output_dir: Path, device: torch.device) -> tuple[dict, dict, list[str], dict[str, str]]:
    """The aligned heatmap files and {arch: (model, image size)}, each checkpoint checked to be the one that made
    its maps (the usual one-line errors for missing or stale files), the run's training caveats and the
    checkpoints' SHA-256 (the report shows the scores only while they are the run's checkpoints)."""
    heatmaps, _ = load_run_heatmaps(output_dir)
    digests = check_checkpoints(output_dir, {arch: heatmap_path(output_dir, arch) for arch in MODEL_ORDER}, heatmaps)
    checkpoints = {arch: load_checkpoint(checkpoint_path(output_dir, arch), arch)
                   for arch in MODEL_ORDER}
    models = {arch: (model_from_checkpoint(checkpoint).to(device).eval(), int(checkpoint["image_size"]))
              for arch, checkpoint in checkpoints.items()}
    caveats = training_caveats({ARCHS[arch].display_name: checkpoint for arch, checkpoint in checkpoints.items()})
    return heatmaps, models, caveats, digests


def load_images(root: Path, paths: list[str], image_size: int, device: torch.device) -> torch.Tensor:
    """(N, 3, S, S) normalised, as the model scripts' eval pass makes them."""
    transform = build_transforms(train=False, image_size=image_size)
    return torch.stack([transform(load_rgb(root / path)) for path in paths]).to(device)


def score_cnn(model, arch: str, images: torch.Tensor, args, target: str) -> dict:
    """The CNN's CAMs on every image, its perturbation methods on the first --perturbation-images."""
    probabilities = soft_vote_probabilities([model])  # one model: its own softmax
    cams = {CAM_DISPLAY_NAMES[method]: cam_saliency(model, arch, method=method) for method in CAM_METHODS}
    name = ARCHS[arch].display_name
    tables = {"cams": score_methods(probabilities, images, cams, target=target, steps=args.steps, seed=args.seed,
                                    desc=name)}
    if args.perturbation_images:
        perturbations = {METHOD_DISPLAY_NAMES[method]: perturbation_saliency(model, method, samples=args.samples,
                                                                             seed=args.seed)
                         for method in PERTURBATION_METHODS}
        tables["perturbation"] = score_methods(probabilities, images[:args.perturbation_images], perturbations,
                                               target=target, steps=args.steps, seed=args.seed, desc=name)
    return tables


def mlp_shares(output_dir: Path, heatmaps: dict, rows: np.ndarray) -> dict | None:
    """Integrated Gradients shares of the final MLP's decision per CNN map, on `rows`; None without a classifier."""
    path = output_dir / FINAL_CLASSIFIER
    if not path.is_file():
        return None
    mlp, classifier = load_classifier(output_dir)
    for arch in MODEL_ORDER:  # the maps it was trained on, not a later export's
        if classifier["sources"][arch]["heatmaps_sha256"] != sha256_of_file(heatmap_path(output_dir, arch)):
            raise PipelineError(f"{heatmap_path(output_dir, arch)} changed after {FINAL_CLASSIFIER} was trained; "
                                f"rerun python {FURTHER_SCRIPT} --output-dir {output_dir}")
    cam_method = classifier.get("cam_method", "gradcam")
    cams = {arch: stored_cams(heatmaps[arch], cam_method, heatmap_path(output_dir, arch))[rows] for arch in MODEL_ORDER}
    features = classifier_features(classifier, cams, {arch: heatmaps[arch]["logits"][rows] for arch in MODEL_ORDER})
    shares = heatmap_shares(mlp, features, grid_size=classifier["grid_size"])
    return {"features": classifier["features"], "cam_method": cam_method, "target": "the MLP's predicted class",
            "average": {name: float(np.nanmean(value)) for name, value in shares.items()},
            "per_image": {"paths": [str(path) for path in heatmaps[MODEL_ORDER[0]]["paths"][rows]],
                          **{name: [float(share) for share in value] for name, value in shares.items()}}}


def write_figures(output_dir: Path, root: Path, paths: list[str], models: dict, args, target_rule: str) -> list[str]:
    """faithfulness/<n>_<image>.png: each image explained by every method of every CNN; returns the names
    relative to output_dir."""
    names = []
    for rank, path in enumerate(paths, start=1):
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(path).stem)  # safe in a file name and a URL
        target = output_dir / FAITHFULNESS_DIR / f"{rank:02d}_{stem}.png"
        explain_image(root / path, models, target, target_rule=target_rule, samples=args.samples, seed=args.seed,
                      title=path)
        names.append(f"{FAITHFULNESS_DIR}/{target.name}")
    return names


def faithfulness_report_markdown(result: dict) -> str:
    """faithfulness.md: one block per CNN, the combined map, the final MLP's shares."""
    parts = [f"# Faithfulness of the explanations of {result['output_dir']}", "",
             f"Deletion and insertion AUC (Petsiuk et al. 2018) on {len(result['images'])} test image(s), a sample "
             f"drawn with seed {result['seed']}; LIME, Kernel SHAP and occlusion on the first "
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
                  f"{len(shares['per_image']['paths'])} test image(s)."]
    return "\n".join(parts) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    device = pick_device(args.device)
    heatmaps, models, caveats, digests = load_models(output_dir, device)
    reference = heatmaps[MODEL_ORDER[0]]
    rows = sample_test_rows(reference["splits"], reference["patients"], args.images, args.seed)
    paths = [str(path) for path in reference["paths"][rows]]
    root = load_split(output_dir / SPLIT_FILE_NAME).root
    target = str(reference["target_class_rule"])
    images = {arch: load_images(root, paths, image_size, device) for arch, (_, image_size) in models.items()}
    started = time.perf_counter()
    cnns = {arch: score_cnn(model, arch, images[arch], args, target) for arch, (model, _) in models.items()}
    sizes = {image_size for _, image_size in models.values()}
    combined = score_combined([(arch, model) for arch, (model, _) in models.items()], images[MODEL_ORDER[0]],
                              methods=CAM_METHODS, target=target, steps=args.steps, seed=args.seed,
                              desc="three CNNs") \
        if len(sizes) == 1 else None
    figure_count = min(args.figures, args.perturbation_images, len(paths))
    figures = write_figures(output_dir, root, paths[:figure_count], models, args, target)
    result = {"output_dir": str(output_dir), "images": paths, "seed": args.seed, "steps": args.steps,
              "perturbation_images": min(args.perturbation_images, len(paths)), "samples": args.samples,
              "device": str(device), "caveats": caveats, "target_class_rule": target, "cnns": cnns,
              "combined": combined, "mlp_shares": mlp_shares(output_dir, heatmaps, np.flatnonzero(
                  reference["splits"] == "test")), "figures": figures,
              "checkpoint_sha256": digests, "seconds": time.perf_counter() - started}
    # Both files or neither (the earlier pair stays on a failure); the report reads the figures the JSON lists.
    with written_together([output_dir / FAITHFULNESS_MD, output_dir / FAITHFULNESS_JSON]) as (markdown, table):
        write_text(markdown, faithfulness_report_markdown(result))
        write_json(table, result)
    print(f"wrote {output_dir / FAITHFULNESS_MD}, {output_dir / FAITHFULNESS_JSON} and {len(figures)} figure(s) "
          f"in {output_dir / FAITHFULNESS_DIR}")
