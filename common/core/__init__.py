"""What every stage shares and nothing below it: the one-line errors (errors), atomic writes and leftovers of killed
runs (fileio), what the console shows (console), and the names of the files in a run folder (runfiles)."""
