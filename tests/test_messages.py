"""What the scripts tell a person: the message after Ctrl-C says what applies to that script, every --help option
shows its default (or says it is required), --max-images above the dataset's size says so, and progress
written to a log file or pipe is a few plain lines, not a carriage-return bar."""

import argparse
import importlib
import sys

import numpy as np
import pytest
import torch

import cancer_class_further
from common.core.console import CommandParser, PlainProgress, progress
from common.core.errors import PipelineError, run_main
from common.core.runfiles import state_path
from common.fusion.mlp import train_mlp
from common.training import model_script

SCRIPTS = ("cancer_class_densenet_121", "cancer_class_resnet_50", "cancer_class_vgg_16", "cancer_class_further",
           "predict", "make_report", "run_pipeline", "make_demo_data", "score_explanations")


def interrupted_stderr(main, capsys) -> str:
    """What run_main prints when `main` is stopped by Ctrl-C (exit status 130)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_main(main)
    assert stopped.value.code == 130
    printed = capsys.readouterr().err
    assert printed.startswith("interrupted: ") and printed.count("\n") == 1, printed
    return printed


def ctrl_c(*_args, **_kwargs):
    raise KeyboardInterrupt


def test_interrupted_further_says_earlier_results_are_intact(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cancer_class_further, "open_run", ctrl_c)
    monkeypatch.setattr(sys, "argv", ["cancer_class_further.py", "--output-dir", str(tmp_path)])
    printed = interrupted_stderr(lambda: cancer_class_further.main(["--output-dir", str(tmp_path)]), capsys)
    assert printed == ("interrupted: every result written before is intact (files are replaced whole); rerun "
                       f"python cancer_class_further.py --output-dir {tmp_path}\n")
    assert "--resume" not in printed  # cancer_class_further.py has no --resume


@pytest.mark.parametrize("epochs_completed", [0, 1])
def test_interrupted_model_script_offers_resume_only_with_a_training_state(demo_dir, tmp_path, monkeypatch, capsys,
                                                                           epochs_completed):
    state = state_path(tmp_path, "resnet50")

    def fit_stopped_by_ctrl_c(*_args, **_kwargs):
        if epochs_completed:
            state.write_bytes(b"the state of a completed epoch")
        raise KeyboardInterrupt

    # fit, which would use the model, is replaced
    monkeypatch.setattr(model_script, "build_model", lambda *args, **kwargs: None)
    monkeypatch.setattr(model_script, "fit", fit_stopped_by_ctrl_c)
    argv = ["--data-dir", str(demo_dir), "--output-dir", str(tmp_path), "--weights", "none", "--cache", "none",
            "--workers", "0", "--val-fraction", "0.25", "--test-fraction", "0.25"]
    printed = interrupted_stderr(lambda: model_script.run_model_script(arch="resnet50", description="", argv=argv),
                                 capsys)
    if epochs_completed:
        assert f"{state} holds the last completed epoch; rerun with --resume" in printed
    else:
        assert "no resnet50 epoch was completed" in printed and "--resume" not in printed


def script_parser(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a script's main() builds, caught where it starts parsing (so nothing else runs)."""
    class Caught(Exception):
        pass

    def catch(parser, *_args, **_kwargs):
        raise Caught(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    monkeypatch.setattr(sys, "argv", [f"{script}.py"])
    with pytest.raises(Caught) as caught:
        importlib.import_module(script).main()
    monkeypatch.undo()
    return caught.value.args[0]


def option_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The option's help text as --help prints it (defaults filled in), on one line."""
    return " ".join(parser._get_formatter()._expand_help(action).split())


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default_or_says_required(script, monkeypatch):
    parser = script_parser(script, monkeypatch)
    options = [action for action in parser._actions if action.option_strings and action.help != argparse.SUPPRESS]
    for action in options:
        if isinstance(action, argparse._HelpAction):
            continue
        text = option_help(parser, action)
        name = action.option_strings[-1]
        assert text, f"{script} {name} has no help"
        assert "(default: None)" not in text, f"{script} {name}: {text}"
        if action.required:
            assert text.endswith("(required)"), f"{script} {name}: {text}"
        elif action.nargs == 0:  # a flag: off unless given; "(default: False)" or "(default: True)" misleads
            assert "(default: True)" not in text and "(default: False)" not in text, f"{script} {name}: {text}"
        elif action.default is not None:
            assert "(default: " in text and f"{action.default})" in text, f"{script} {name}: {text}"
        else:  # None: the text says what leaving it out means
            assert "(default: " in text or "required" in text, f"{script} {name}: {text}"
        assert text.count("default") <= 1, f"{script} {name} shows two defaults: {text}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_keeps_the_docstrings_example_commands_one_per_line(script, monkeypatch):
    module = importlib.import_module(script)
    commands = [line for line in module.__doc__.splitlines() if line.strip().startswith(("python ", "torchrun "))]
    assert commands
    help_lines = script_parser(script, monkeypatch).format_help().splitlines()
    for command in commands:
        assert command in help_lines


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_mistyped_option_is_one_line_naming_the_closest_valid_one(script, monkeypatch, capsys):
    """`--outputdir` for `--output-dir` (a hyphen dropped): one line, exit status 2, the right option named,
    whatever else the command line holds (its required options given)."""
    parser = script_parser(script, monkeypatch)
    assert isinstance(parser, CommandParser)
    option = next(name for name in parser.option_names() if "-" in name[2:])
    typo = "--" + option[2:].replace("-", "", 1)
    required = [word for action in parser._actions if action.required and action.option_strings
                for word in (action.option_strings[0], "x")]
    monkeypatch.setattr(sys, "argv", [f"{script}.py", typo, "1", *required, "positional"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_main(importlib.import_module(script).main)
    assert stopped.value.code == 2
    printed = capsys.readouterr().err
    assert printed.startswith(f"error: unknown option {typo}; did you mean {option}? (see python {script}.py --help")
    assert printed.count("\n") == 1, printed


def test_no_amp_help_says_mixed_precision_is_on_without_it(monkeypatch):
    parser = script_parser("cancer_class_resnet_50", monkeypatch)
    no_amp = next(action for action in parser._actions if "--no-amp" in action.option_strings)
    text = option_help(parser, no_amp)
    assert "(default: True)" not in text
    assert "float32" in text and "without this flag CUDA uses mixed precision" in text


def test_data_dir_help_names_every_manifest_column(monkeypatch):
    parser = script_parser("cancer_class_resnet_50", monkeypatch)
    data_dir = next(action for action in parser._actions if "--data-dir" in action.option_strings)
    assert "path,label[,patient,magnification,subtype]" in option_help(parser, data_dir)


@pytest.mark.parametrize("max_images, note_expected", [(1000, True), (10, False)])
def test_max_images_above_the_dataset_size_says_so(demo_dir, tmp_path, capsys, max_images, note_expected):
    # --heatmaps-only without a checkpoint stops (with its own error) right after the split is made.
    argv = ["--data-dir", str(demo_dir), "--output-dir", str(tmp_path), "--max-images", str(max_images),
            "--heatmaps-only", "--val-fraction", "0.25", "--test-fraction", "0.25"]
    with pytest.raises(PipelineError, match="does not exist"):
        model_script.run_model_script(arch="resnet50", description="", argv=argv)
    printed = capsys.readouterr().out
    note = f"note: --max-images {max_images} is not below the dataset's 48 images: all of them are used"
    assert (note in printed) == note_expected, printed


def test_progress_to_a_pipe_is_a_few_plain_lines(capsys):
    shown = progress(range(1000), total=1000, desc="epoch 1 train")
    for step in shown:
        shown.set_postfix(loss=f"{1 / (step + 1):.4f}")
    printed = capsys.readouterr().err
    assert "\r" not in printed
    lines = printed.splitlines()
    assert lines == ["epoch 1 train: 250/1000 (25 %) loss=0.0040", "epoch 1 train: 500/1000 (50 %) loss=0.0020",
                     "epoch 1 train: 750/1000 (75 %) loss=0.0013", "epoch 1 train: 1000/1000 (100 %) loss=0.0010"]


def test_progress_of_a_short_loop_prints_each_quarter_once(capsys):
    for _ in progress(range(3), total=3, desc="validate"):
        pass
    assert capsys.readouterr().err.splitlines() == ["validate: 1/3 (33 %)", "validate: 2/3 (66 %)",
                                                    "validate: 3/3 (100 %)"]


def test_progress_without_a_length_prints_only_by_time(capsys):
    assert list(PlainProgress(iter(range(5)), total=None, desc="export")) == list(range(5))
    assert capsys.readouterr().err == ""  # a 60 s interval: none within this loop
    list(PlainProgress(iter(range(2)), total=None, desc="export", interval=0))
    assert capsys.readouterr().err.splitlines() == ["export: 1", "export: 2"]


def test_mlp_training_progress_to_a_pipe_has_no_carriage_returns(capsys):
    generator = np.random.default_rng(0)
    features = generator.normal(size=(40, 8)).astype(np.float32)
    labels = np.arange(40) % 2
    patients = np.array([f"p{row // 4}" for row in range(40)])
    train_mlp(features, labels, patients, np.arange(32), np.arange(32, 40), hidden_sizes=[4], dropout=0.0,
              epochs=12, batch_size=8, lr=1e-2, weight_decay=0.0, optimizer="adamw", seed=0,
              device=torch.device("cpu"), desc="MLP on heatmaps")
    printed = capsys.readouterr().err
    assert "\r" not in printed
    assert printed.splitlines() == [f"MLP on heatmaps: {epoch}/12 ({epoch * 100 // 12} %)" for epoch in (3, 6, 9, 12)]
