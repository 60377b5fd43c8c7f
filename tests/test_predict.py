"""predict.py on a finished single-split run: each CNN's P(malignant) equals a direct forward pass of its saved
model, the soft vote is their mean, the final MLP agrees with the run's own test predictions; any image size and
mode works; predictions.csv and one overlay per image (titled panels, the image's aspect ratio, a colour bar); bad
inputs and unfinished runs stop with a one-line error naming what to run. Also run_pipeline.py's argument check.
(predict.py on a K-fold run: tests/test_cv.py.)

The run dir is conftest's `pipeline_run` (run_pipeline.py --folds 1 on the demo tree), made once per session.
"""

import csv
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from common.cams.heatmap_file import load_heatmaps
from common.core.errors import run_main
from common.core.fileio import save_npz, sha256_of_file
from common.core.runfiles import checkpoint_path, heatmap_path
from common.data.partition import load_split
from common.data.transforms import build_transforms
from common.evaluation.calibration import apply_temperature
from common.evaluation.conformal import prediction_sets, set_names, threshold_from_scores
from common.evaluation.metrics import softmax
from common.inference import load_run_models, predict_batches
from common.models.checkpoints import load_checkpoint, model_from_checkpoint, training_caveats
from common.models.registry import MODEL_ORDER
from common.run import open_run

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
COLUMNS = list(MODEL_ORDER) + ["soft_vote", "final_mlp"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def assert_one_line_error(returncode: int, stderr: str, *fragments: str) -> None:
    assert returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0]


def predict_in_process(argv: list[str], capsys) -> tuple[int, str]:
    """predict.py's entry point as its __main__ runs it (run_main), without a new interpreter: (status, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: predict.main(argv))
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def run_dir(pipeline_run) -> Path:
    return pipeline_run


@pytest.fixture(scope="module")
def split(run_dir):
    return load_split(run_dir / "split.json")


@pytest.fixture(scope="module")
def images(tmp_path_factory, split) -> dict[str, Path]:
    """Two test-split demo images, one train image, and new images of other sizes and colour modes."""
    folder = tmp_path_factory.mktemp("new_images")
    rng = np.random.default_rng(0)
    test_rows, train_rows = split.indices("test"), split.indices("train")
    chosen = {"test_a": split.root / split.records[test_rows[0]].path,
              "test_b": split.root / split.records[test_rows[-1]].path,
              "train": split.root / split.records[train_rows[0]].path}
    Image.fromarray(rng.integers(0, 256, (77, 123, 3), dtype=np.uint8)).save(folder / "odd_size.png")
    Image.fromarray(rng.integers(0, 256, (90, 60, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (50, 50), dtype=np.uint8), "L").save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 256, (40, 300, 3), dtype=np.uint8)).save(folder / "wide.jpg")
    chosen.update({name: folder / f"{name}.png" for name in ("odd_size", "rgba", "grey")})
    chosen["wide"] = folder / "wide.jpg"
    for name in ("rgba", "grey"):  # the same pictures converted to RGB by PIL
        open_rgb(chosen[name]).save(folder / f"{name}_as_rgb.png")
        chosen[f"{name}_as_rgb"] = folder / f"{name}_as_rgb.png"
    return chosen


@pytest.fixture(scope="module")
def models(run_dir):
    return load_run_models(open_run(run_dir), CPU)


@pytest.fixture(scope="module")
def predicted(models, images) -> dict:
    """predict_batches over `images`, gathered into whole arrays (cams, probabilities, images)."""
    parts = list(predict_batches(list(images.values()), models))
    whole = {key: {name: np.concatenate([part[key][name] for part in parts]) for name in parts[0][key]}
             for key in ("cams", "probabilities")}
    return {**whole, "images": [image for part in parts for image in part["images"]]}


def open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def direct_probabilities(run_dir: Path, arch: str, paths: list[Path]) -> np.ndarray:
    """The trusted reference: the saved model, eval mode, eval transforms, a plain forward, softmax."""
    checkpoint = load_checkpoint(checkpoint_path(run_dir, arch), arch)
    model = model_from_checkpoint(checkpoint).eval()
    transform = build_transforms(train=False, image_size=checkpoint["image_size"])
    batch = torch.stack([transform(open_rgb(path)) for path in paths])
    with torch.no_grad():
        return softmax(model(batch).numpy())[:, 1]


def test_probabilities_are_in_unit_interval(predicted, images):
    probabilities = predicted["probabilities"]
    assert set(probabilities) == set(COLUMNS)
    for name in COLUMNS:
        values = probabilities[name]
        assert values.shape == (len(images),) and np.isfinite(values).all(), name
        assert ((values >= 0) & (values <= 1)).all(), name


def test_each_cnn_equals_a_direct_forward_pass(run_dir, predicted, images):
    for arch in MODEL_ORDER:
        expected = direct_probabilities(run_dir, arch, list(images.values()))
        np.testing.assert_allclose(predicted["probabilities"][arch], expected, rtol=0, atol=1e-5, err_msg=arch)


def test_soft_vote_is_the_mean_of_the_three(predicted):
    probabilities = predicted["probabilities"]
    np.testing.assert_allclose(probabilities["soft_vote"], np.mean([probabilities[a] for a in MODEL_ORDER], axis=0),
                               rtol=0, atol=1e-7)


def test_demo_images_match_the_runs_heatmaps_and_test_predictions(run_dir, predicted, images, split):
    """Predicting an image of the run gives the probabilities and maps its model scripts exported, and for a test
    image the final MLP's probability in test_predictions.npz."""
    names = list(images)
    row_of = {str(split.root / record.path): row for row, record in enumerate(split.records)}
    for arch in MODEL_ORDER:
        exported = load_heatmaps(heatmap_path(run_dir, arch))
        for name in ("test_a", "test_b", "train"):
            row, index = row_of[str(images[name])], names.index(name)
            assert predicted["probabilities"][arch][index] == pytest.approx(
                softmax(exported["logits"][row:row + 1])[0, 1], abs=1e-5)
            np.testing.assert_allclose(predicted["cams"][arch][index], exported["cams"][row], rtol=1e-3, atol=1e-5)
    saved = np.load(run_dir / "test_predictions.npz", allow_pickle=False)
    saved_paths = list(saved["paths"])
    for name in ("test_a", "test_b"):
        saved_row = saved_paths.index(split.records[row_of[str(images[name])]].path)
        assert predicted["probabilities"]["final_mlp"][names.index(name)] == pytest.approx(
            float(saved["prob_mlp_heatmaps"][saved_row]), abs=1e-4)


def test_batches_give_the_same_numbers_as_one_pass(models, predicted, images):
    """predict.py streams batches (flat memory); each image's numbers do not depend on its batch."""
    batches = list(predict_batches(list(images.values()), models, batch_size=4))
    assert [len(batch["paths"]) for batch in batches] == [4, 4, 1]  # 9 images
    assert [path for batch in batches for path in batch["paths"]] == list(images.values())
    for column in COLUMNS:
        streamed = np.concatenate([batch["probabilities"][column] for batch in batches])
        np.testing.assert_allclose(streamed, predicted["probabilities"][column], rtol=0, atol=1e-5, err_msg=column)


def test_image_modes_are_converted_to_rgb(predicted, images):
    """RGBA and greyscale files predict like their RGB conversion."""
    names = list(images)
    for name in ("rgba", "grey"):
        for column in COLUMNS:
            values = predicted["probabilities"][column]
            assert values[names.index(name)] == pytest.approx(values[names.index(f"{name}_as_rgb")], abs=1e-6)


# --------------------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def cli_run(run_dir, images, tmp_path_factory) -> dict:
    """predict.py on one file and one folder (two images at its top, two in a subfolder, one of them with a
    top-level image's file name, and a text file that is skipped)."""
    work = tmp_path_factory.mktemp("predict_cli")
    folder = work / "folder"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(images["test_a"], folder / "b_first.png")
    shutil.copy(images["grey"], folder / "a_grey.png")
    shutil.copy(images["wide"], folder / "nested" / "wide.jpg")
    shutil.copy(images["odd_size"], folder / "nested" / "b_first.png")  # same file name as a top-level image
    (folder / "README.txt").write_text("not an image, and not an image extension: skipped\n")
    out = work / "out"
    finished = run_script("predict.py", "--output-dir", str(run_dir), "--out", str(out), "--device", "cpu",
                          str(images["odd_size"]), str(folder))
    assert finished.returncode == 0, finished.stderr[-3000:]
    expected_inputs = [images["odd_size"], folder / "a_grey.png", folder / "b_first.png",
                       folder / "nested" / "b_first.png", folder / "nested" / "wide.jpg"]
    with open(out / "predictions.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    return {"finished": finished, "out": out, "table": table, "inputs": expected_inputs}


def test_cli_writes_one_csv_row_per_image_with_the_printed_columns(cli_run, run_dir):
    header, *rows = cli_run["table"]
    printed = cli_run["finished"].stdout.splitlines()
    printed_header = next(line for line in printed if line.startswith("image "))
    printed_columns = printed_header.split()[1:1 + len(COLUMNS)]
    assert printed_columns == COLUMNS
    assert header == (["image"] + [f"p_malignant_{name}" for name in printed_columns]
                      + [f"p_malignant_{name}_calibrated" for name in printed_columns]
                      + ["prediction", "conformal_set_image_level_alpha_0.1", "overlay", "scored_by"])
    assert [row[0] for row in rows] == [str(path) for path in cli_run["inputs"]]  # the folder expanded, sorted
    after_header = printed[printed.index(printed_header) + 1:]
    body = [line for line in after_header if not line.startswith("  note: ")][:len(rows)]
    # The run's own test image among the inputs (a copy, found by its bytes) is flagged under its row.
    assert any(line.startswith("  note: ") and "one of this run's own test images" in line for line in after_header)
    classifier = torch.load(run_dir / "final_classifier.pth", map_location="cpu", weights_only=True)
    image_threshold = threshold_from_scores(classifier["conformal"]["image_scores"].numpy(), 0.1)
    for row, line in zip(rows, body):
        values = [float(value) for value in row[1:1 + len(COLUMNS)]]
        calibrated = [float(value) for value in row[1 + len(COLUMNS):1 + 2 * len(COLUMNS)]]
        assert all(0 <= value <= 1 for value in values)
        for name, value, scaled in zip(COLUMNS, values, calibrated):  # the run's temperatures, decisions kept
            assert scaled == pytest.approx(apply_temperature(value, classifier["temperatures"][name]), abs=2e-6)
            assert (scaled >= 0.5) == (value >= 0.5)
        verdict, image_set = row[1 + 2 * len(COLUMNS)], row[2 + 2 * len(COLUMNS)]
        assert verdict == ("malignant" if values[-1] >= 0.5 else "benign")
        assert image_set == set_names(prediction_sets(np.array([calibrated[-1]]), image_threshold))[0]
        printed_values = [float(value) for value in line[40:].split()[:len(COLUMNS) + 1]]
        np.testing.assert_allclose(printed_values, values + calibrated[-1:], atol=5e-4 + 1e-9)
        assert f" {verdict} " in line and line.rstrip().endswith(image_set)


def test_one_patients_images_get_a_patient_level_set_at_the_chosen_alpha(run_dir, images, tmp_path, capsys):
    """--one-patient: the mean calibrated P of the inputs and its set from the held-out patients' scores."""
    capsys.readouterr()
    predict.main(["--output-dir", str(run_dir), "--out", str(tmp_path / "out"), "--device", "cpu", "--one-patient",
                  "--alpha", "0.3", str(images["odd_size"]), str(images["wide"])])
    stdout = capsys.readouterr().out
    with open(tmp_path / "out" / "predictions.csv", newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    calibrated = [float(row[header.index("p_malignant_final_mlp_calibrated")]) for row in rows]
    classifier = torch.load(run_dir / "final_classifier.pth", map_location="cpu", weights_only=True)
    threshold = threshold_from_scores(classifier["conformal"]["patient_scores"].numpy(), 0.3)
    expected = set_names(prediction_sets(np.array([np.mean(calibrated)]), threshold))[0]
    assert "conformal_set_image_level_alpha_0.3" in header
    assert f"one patient (2 images): mean calibrated P(malignant) {np.mean(calibrated):.3f}" in stdout
    assert f"conformal set at alpha 0.3 (patient level): {expected}\n" in stdout
    status, stderr = predict_in_process(["--output-dir", str(run_dir), "--alpha", "1.5", str(images["wide"])], capsys)
    assert status == 2 and "--alpha 1.5: must be in (0, 1)" in stderr


def test_cli_agrees_with_predict_batches(cli_run, predicted, images):
    """The CSV's numbers are predict_batches' for the same pictures (the folder holds copies of `images`)."""
    _, *rows = cli_run["table"]
    names = list(images)
    sources = ["odd_size", "grey", "test_a", "odd_size", "wide"]  # cli_run's inputs, in order
    for column_index, column in enumerate(COLUMNS):
        expected = predicted["probabilities"][column][[names.index(source) for source in sources]]
        np.testing.assert_allclose([float(row[1 + column_index]) for row in rows], expected, rtol=0, atol=2e-6)


def test_cli_writes_one_overlay_per_image(cli_run):
    """Also for two images of the same file name in different folders (they must not overwrite each other)."""
    _, *rows = cli_run["table"]
    overlays = [Path(row[-2]) for row in rows]
    assert len(set(overlays)) == len(rows)
    assert overlays[2].name == "b_first_gradcam.png" and overlays[3].name == "b_first_2_gradcam.png"
    assert sorted(cli_run["out"].glob("*.png")) == sorted(overlays)
    for overlay in overlays:
        with Image.open(overlay) as image:
            image.load()
            assert image.format == "PNG" and image.width > 2 * image.height


def test_overlay_panels_are_titled_keep_the_aspect_ratio_and_have_a_colour_bar():
    """A 700x460 BreaKHis-sized image: every panel 700:460 (maps stretched to it), titled with its model and
    P(malignant), and a colour bar saying what red means."""
    image = Image.new("RGB", (700, 460), (200, 120, 160))
    cams = {arch: np.arange(49, dtype=np.float32).reshape(7, 7) for arch in MODEL_ORDER}
    probabilities = {**{arch: 0.25 for arch in MODEL_ORDER}, "soft_vote": 0.25, "final_mlp": 0.75}
    figure = predict.overlay_figure(image, cams, probabilities, "x.png")
    panels = [axes for axes in figure.axes if axes.images and axes.get_title()]
    assert [axes.get_title().split("\n")[0] for axes in panels] == ["image", "DenseNet-121", "ResNet-50", "VGG-16",
                                                                    "combined"]
    assert all(axes.images[0].get_array().shape[:2] == (460, 700) for axes in panels)
    assert "P(malignant) 0.250" in panels[1].get_title() and "final MLP P 0.750" in panels[-1].get_title()
    bar = next(axes for axes in figure.axes if axes not in panels)
    assert "evidence for the explained class" in bar.get_ylabel()


def test_an_image_of_the_runs_training_split_is_noted(run_dir, images, tmp_path, capsys):
    """A single-split run's models have seen its train images: predict.py says so beside the numbers."""
    predict.main(["--output-dir", str(run_dir), "--out", str(tmp_path / "out"), "--device", "cpu",
                  str(images["train"]), str(images["test_a"]), str(images["odd_size"])])
    with open(tmp_path / "out" / "predictions.csv", newline="", encoding="utf-8") as handle:
        notes = [row["scored_by"] for row in csv.DictReader(handle)]
    assert notes == ["the run's models; a train image of this run, which the models have seen (not an evaluation)",
                     "the run's models; a test image of this run", "the run's models"]


def test_cli_warns_that_a_random_init_run_on_demo_data_says_nothing(cli_run):
    """pipeline_run trained every CNN with --weights none on the synthetic demo tree; its checkpoints say so."""
    stdout = cli_run["finished"].stdout
    assert "WARNING: the models of" in stdout and "say nothing about real tissue" in stdout
    assert stdout.index("WARNING: the models of") < stdout.index("image ")  # above the table it qualifies
    assert "DenseNet-121, ResNet-50, VGG-16: trained from random initialisation (--weights none)" in stdout
    assert "DenseNet-121, ResNet-50, VGG-16: trained on synthetic demo data" in stdout


def test_no_warning_for_pretrained_models_on_real_data(tmp_path, capsys):
    pretrained = {"model": {}, "config": {"weights": "imagenet"}, "synthetic_data": False}
    predict.warn_about_training(training_caveats({arch: [pretrained] for arch in MODEL_ORDER}), tmp_path)
    assert capsys.readouterr().out == ""
    # One fold's checkpoint of one model on demo data is enough for the warning.
    caveats = training_caveats({**{arch: [pretrained] for arch in MODEL_ORDER},
                                "ResNet-50": [pretrained, {**pretrained, "synthetic_data": True}]})
    predict.warn_about_training(caveats, tmp_path)
    assert "WARNING:   ResNet-50: trained on synthetic demo data" in capsys.readouterr().out


def test_printed_probability_beside_the_threshold_agrees_with_the_verdict(run_dir, tmp_path, capsys, monkeypatch):
    """A final MLP at 0.4996 is benign: predict.py must not print 0.500 beside it (nor 0.500000 in the CSV)."""
    inputs = [tmp_path / "below.png", tmp_path / "at.png"]
    for path in inputs:
        Image.new("RGB", (8, 8)).save(path)
    final = np.array([0.4996, 0.5])

    def two_images(image_paths, models, batch_size):
        yield {"paths": image_paths, "cams": {arch: np.ones((2, 2, 2), np.float32) for arch in MODEL_ORDER},
               "probabilities": {**{name: np.full(2, 0.49999) for name in COLUMNS[:-1]}, "final_mlp": final},
               "images": [Image.new("RGB", (64, 64))] * 2}

    monkeypatch.setattr(predict, "predict_batches", two_images)
    predict.main(["--output-dir", str(run_dir), "--out", str(tmp_path / "out"), "--device", "cpu",
                  *map(str, inputs)])
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("below", "at.png"))]
    assert [line[1:6] + line[7:8] for line in printed] == [["0.49999"] * 4 + ["0.4996", "benign"],
                                                           ["0.49999"] * 4 + ["0.500", "malignant"]]
    assert [float(line[6]) >= 0.5 for line in printed] == [False, True]  # the calibrated P: the same sides
    with open(tmp_path / "out" / "predictions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))[1:]
    assert [[row[len(COLUMNS)], row[1 + 2 * len(COLUMNS)]] for row in rows] == [["0.499600", "benign"],
                                                                                ["0.500000", "malignant"]]


# ------------------------------------------------------------------------------------------------ bad inputs


def test_non_image_file_is_a_one_line_error_naming_it(run_dir, images, tmp_path):
    """The real command line: exit status 2, `error: ...` naming the file, no traceback, nothing written."""
    bad = tmp_path / "notes.txt"
    bad.write_text("plain text\n")
    finished = run_script("predict.py", "--output-dir", str(run_dir), "--out", str(tmp_path / "out"),
                          "--device", "cpu", str(images["odd_size"]), str(bad))
    assert_one_line_error(finished.returncode, finished.stderr, str(bad))
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_image_with_an_image_extension_but_other_content(run_dir, images, tmp_path, capsys):
    bad = tmp_path / "folder" / "fake.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not really a PNG")
    status, stderr = predict_in_process(["--output-dir", str(run_dir), "--out", str(tmp_path / "out"),
                                         "--device", "cpu", str(images["odd_size"]), str(bad.parent)], capsys)
    assert_one_line_error(status, stderr, str(bad))
    assert not (tmp_path / "out").exists()


def test_a_folder_that_holds_no_run_says_how_to_make_one(images, tmp_path, capsys):
    status, stderr = predict_in_process(["--output-dir", str(tmp_path), "--device", "cpu", str(images["odd_size"])],
                                        capsys)
    assert_one_line_error(status, stderr, f"--output-dir {tmp_path} holds no run", "python run_pipeline.py")


def test_an_unfinished_run_names_its_first_missing_stage(run_dir, images, tmp_path, capsys):
    """Only the split: the first model script is what to run; every model but no final stage: the final stage."""
    shutil.copy(run_dir / "split.json", tmp_path / "split.json")
    status, stderr = predict_in_process(["--output-dir", str(tmp_path), "--device", "cpu", str(images["odd_size"])],
                                        capsys)
    data_root = load_split(run_dir / "split.json").root
    assert_one_line_error(status, stderr, f"{checkpoint_path(tmp_path, 'densenet121')} is missing: run python "
                                          f"cancer_class_densenet_121.py --data-dir {data_root} "
                                          f"--output-dir {tmp_path}")
    for arch in MODEL_ORDER:
        for path in (checkpoint_path(run_dir, arch), heatmap_path(run_dir, arch)):
            os.symlink(path, tmp_path / path.name)
    status, stderr = predict_in_process(["--output-dir", str(tmp_path), "--device", "cpu", str(images["odd_size"])],
                                        capsys)
    assert_one_line_error(status, stderr, f"{tmp_path / 'results.json'} is missing: run python "
                                          f"cancer_class_further.py --output-dir {tmp_path}")


def test_run_dir_without_a_cnn_checkpoint(run_dir, images, tmp_path, capsys):
    for name in ("final_classifier.pth", "results.json", "split.json"):
        shutil.copy(run_dir / name, tmp_path / name)
    status, stderr = predict_in_process(["--output-dir", str(tmp_path), "--device", "cpu", str(images["odd_size"])],
                                        capsys)
    assert_one_line_error(status, stderr, str(checkpoint_path(tmp_path, MODEL_ORDER[0])))


def test_cnn_checkpoint_changed_after_the_mlp_was_trained(run_copy, retrain, images, capsys):
    """A CNN retrained (and its maps remade) after cancer_class_further.py no longer matches the MLP's features."""
    checkpoint, heatmap_file = checkpoint_path(run_copy, MODEL_ORDER[0]), heatmap_path(run_copy, MODEL_ORDER[0])
    retrain(checkpoint)
    save_npz(heatmap_file, **{**load_heatmaps(heatmap_file), "checkpoint_sha256": np.array(sha256_of_file(checkpoint))})
    status, stderr = predict_in_process(["--output-dir", str(run_copy), "--device", "cpu", str(images["odd_size"])],
                                        capsys)
    assert_one_line_error(status, stderr, f"{checkpoint} is not the checkpoint final_classifier.pth was fitted on",
                          f"rerun python cancer_class_further.py --output-dir {run_copy}")


def test_heatmaps_of_another_checkpoint_are_refused(run_copy, retrain, demo_dir, images, capsys):
    """A model script rerun that stopped after writing its checkpoint, before its heatmap export: the stale maps
    must be remade before the MLP is retrained on them."""
    retrain(checkpoint_path(run_copy, "resnet50"))
    status, stderr = predict_in_process(["--output-dir", str(run_copy), "--device", "cpu", str(images["odd_size"])],
                                        capsys)
    assert_one_line_error(status, stderr, f"{heatmap_path(run_copy, 'resnet50')} is stale",
                          f"python cancer_class_resnet_50.py --data-dir {demo_dir} --output-dir {run_copy}",
                          "--heatmaps-only",
                          f"then python cancer_class_further.py --output-dir {run_copy}")


def test_a_full_disk_while_writing_overlays_is_one_line_and_keeps_the_earlier_results(run_dir, images, tmp_path,
                                                                                      capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("an earlier run's predictions\n")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full_disk)
    status, stderr = predict_in_process(["--output-dir", str(run_dir), "--out", str(out), "--device", "cpu",
                                         str(images["odd_size"])], capsys)
    overlay = out / predict.overlay_names([images["odd_size"]])[0]
    assert_one_line_error(status, stderr, f"the disk is full: cannot write {overlay} ", "earlier results are intact")
    assert os.listdir(out) == ["predictions.csv"]
    assert (out / "predictions.csv").read_text() == "an earlier run's predictions\n"
    assert os.listdir(tmp_path) == ["out"]  # no staging folder left


def test_missing_input_path(run_dir, tmp_path, capsys):
    missing = tmp_path / "no_such_image.png"
    status, stderr = predict_in_process(["--output-dir", str(run_dir), "--device", "cpu", str(missing)], capsys)
    assert_one_line_error(status, stderr, str(missing))


def test_folder_without_images(run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here\n")
    status, stderr = predict_in_process(["--output-dir", str(run_dir), "--device", "cpu", str(tmp_path / "empty")],
                                        capsys)
    assert_one_line_error(status, stderr, "no image files", str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------------- run_pipeline.py


@pytest.mark.parametrize("arguments", [[], ["--demo", "--data-dir", "somewhere"]])
def test_run_pipeline_needs_exactly_one_of_demo_and_data_dir(arguments, tmp_path):
    finished = run_script("run_pipeline.py", *arguments, "--output-dir", str(tmp_path / "run"))
    assert finished.returncode == 2
    assert "--demo" in finished.stderr and "--data-dir" in finished.stderr
    assert "Traceback" not in finished.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_demo_gives_each_model_its_own_lr_and_vgg16_a_smaller_one():
    """VGG-16 has no batch norm: at the demo's former shared lr 1e-3 it diverged (first-epoch train loss 21.5) and
    stayed at chance. 1e-4 with 15 epochs is what learned the demo data (see run_pipeline.DEMO_ARCH_ARGS)."""
    import importlib

    import run_pipeline
    from common.models.registry import ARCHS
    from common.training.config import parse_config

    for kind, vgg_epochs in (("single", 15), ("kfold", 3)):
        assert set(run_pipeline.DEMO_ARCH_ARGS[kind]) == set(ARCHS)
        demo = {}
        for spec in ARCHS.values():  # the options each script really gets, parsed by its own parser
            module = importlib.import_module(spec.script.removesuffix(".py"))
            argv = ["--data-dir", "demo_data", *run_pipeline.DEMO_MODEL_ARGS,
                    *run_pipeline.DEMO_ARCH_ARGS[kind][spec.name]]
            demo[module.ARCH] = parse_config(arch=module.ARCH, description="", argv=argv, **module.DEFAULTS)
        assert (demo["vgg16"].lr, demo["vgg16"].epochs) == (1e-4, vgg_epochs)
        assert demo["densenet121"].lr == demo["resnet50"].lr == 1e-3


def test_the_overlay_strip_labels_a_flat_map_and_keeps_the_others_as_drawn():
    """A 1x1 map (a small input size) has no contrast: its panel in predict.py's strip carries the note; a map
    with contrast is drawn as before."""
    from common.cams.display import blend, colorize, label_flat

    image = Image.new("RGB", (140, 92), (190, 140, 170))
    cams = {"densenet121": np.zeros((1, 1), np.float32), "resnet50": np.eye(4, dtype=np.float32),
            "vgg16": np.eye(8, dtype=np.float32)}
    probabilities = {"densenet121": 0.2, "resnet50": 0.7, "vgg16": 0.6, "final_mlp": 0.65}
    figure = predict.overlay_figure(image, cams, probabilities, "x.png")
    shown = [axis.get_images()[0].get_array() for axis in figure.axes if axis.get_images()]
    assert np.array_equal(shown[1], np.asarray(label_flat(blend(image, colorize(cams["densenet121"], image.size)))))
    assert np.array_equal(shown[2], np.asarray(blend(image, colorize(cams["resnet50"], image.size))))
    labels = [axis.get_ylabel() for axis in figure.axes]
    assert "evidence for the explained class\n(each map scaled to its own range)" in labels  # the colour bar
