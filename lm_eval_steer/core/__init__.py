"""What every part of lm-eval-steer shares: one-line errors, atomic writes, digests, the packaged data's
paths, console output, locating results and samples files, the IFEval subsets and scorer, and the
looping (degeneracy) measure. Nothing here imports from the rest of the package."""
