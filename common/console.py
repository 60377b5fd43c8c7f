"""What the scripts show a person on the console: the --help layout."""

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The script's docstring keeps its layout (its example commands stay one per line), and every option shows
    its default, except where a default would mislead:

    - a required option has none: it says "(required)";
    - an option whose default is None (e.g. --fold-file, --max-images) has its meaning in its help text, where
      "(default: None)" would add nothing;
    - a flag (--resume, --no-amp) is off unless given: "(default: True)" after --no-amp read as "AMP off"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.required and action.option_strings:  # (a positional is required by its form)
            return f"{help_text} (required)".strip()
        if action.default is None or action.nargs == 0:
            return help_text
        return super()._get_help_string(action)

