"""The static HTML report of a run: its HTML pieces (html), the gallery of held-out images (gallery), the
single-split page (single), the K-fold page with its folds' pages (kfold), the interpretability section
(interpretability), and the build that picks the page by the run's kind (build)."""
