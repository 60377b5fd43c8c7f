"""The exceptions the scripts turn into a one-line message instead of a traceback: a bad input, a Ctrl-C."""

import errno
import os
import shlex
import sys
from collections.abc import Callable

# The errors a write gets when the file system has no room left for it (the disk, or the user's quota).
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# The errors of a path that cannot be used as it is: no permission, read-only, a file where a folder should be.
UNUSABLE_PATH_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST)


# What a Ctrl-C leaves, unless the script says more (an Interrupted): files are only ever replaced whole.
INTERRUPTED_MESSAGE = "every result written before is intact (files are replaced whole); rerun"


def typed_command() -> str:
    """The command as the user typed it (python <script> <arguments>), to paste back."""
    return shlex.join(["python", os.path.basename(sys.argv[0]), *sys.argv[1:]])


# Set by run_pipeline.py for the stages it starts: a Ctrl-C reaches the stage and the driver together, and the
# driver's one line (what is intact, the command that resumes the whole run) speaks for both.
STAGE_OF_PIPELINE_ENV = "BREAKHIS_STAGE_OF_PIPELINE"


class PipelineError(Exception):
    """Bad input or an unusable file: the message names the file or option and says what to do."""


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C, re-raised by a script that knows what it leaves behind: the message says how to go on."""


def message_of(error: PipelineError) -> str:
    """The error's own message, also when a DataLoader worker raised it: torch re-raises a worker's exception
    with the worker's whole traceback as its message, which ends with `<module>.PipelineError: <message>`."""
    message = str(error).strip()
    marker = f"{PipelineError.__module__}.{PipelineError.__qualname__}: "
    if "Original Traceback" in message and marker in message:
        message = message.rpartition(marker)[2]
    return message


def quiet_interrupts_in_a_pipeline_stage() -> None:
    """In a stage that run_pipeline.py started: a Ctrl-C that ends the process outside run_main (during its
    imports) prints no traceback (the exit status stays that of an interrupt)."""
    if not os.environ.get(STAGE_OF_PIPELINE_ENV):
        return
    report = sys.excepthook

    def quiet_on_interrupt(kind, value, traceback):
        if not issubclass(kind, KeyboardInterrupt):
            report(kind, value, traceback)

    sys.excepthook = quiet_on_interrupt


def run_main(main: Callable[[], object]) -> None:
    """Run a script's main(); a PipelineError becomes `error: ...` (one line) on stderr and exit status 2, a
    Ctrl-C `interrupted: ...` (what is kept, how to go on) and exit status 130."""
    try:
        main()
    except PipelineError as error:
        print(f"error: {message_of(error)}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        # Last resort: the output folders are checked up front (fileio.check_writable_folder) and the result files
        # go through common/core/fileio.py, which names the file; this catches the rest (e.g. a log line appended
        # after each epoch, a folder made read-only during the run).
        if error.errno in DISK_FULL_ERRNOS:
            print(f"error: the disk is full: cannot write {error.filename or 'a file'} ({error.strerror}); results "
                  "written before are intact; free space and rerun", file=sys.stderr)
        elif error.errno in UNUSABLE_PATH_ERRNOS and error.filename:
            print(f"error: {error.filename}: {error.strerror}; results written before are intact", file=sys.stderr)
        else:
            raise
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        message = str(interrupt) if isinstance(interrupt, Interrupted) else f"{INTERRUPTED_MESSAGE} {typed_command()}"
        if not os.environ.get(STAGE_OF_PIPELINE_ENV):
            print(f"interrupted: {message}", file=sys.stderr)
        sys.exit(130)
