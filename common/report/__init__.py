"""The static HTML report of a run: its HTML pieces (html), the single-split page (single), the K-fold page
(kfold), and the interpretability section (interpretability)."""
