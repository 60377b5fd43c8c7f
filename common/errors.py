"""The one exception type the scripts turn into a one-line error message instead of a traceback."""

import sys
from collections.abc import Callable


class PipelineError(Exception):
    """Bad input or an unusable file: the message names the file or option and says what to do."""


def run_main(main: Callable[[], object]) -> None:
    """Run a script's main(); a PipelineError becomes `error: ...` on stderr and exit status 2."""
    try:
        main()
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last completed checkpoint is kept; rerun with --resume", file=sys.stderr)
        sys.exit(130)
