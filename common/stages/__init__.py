"""The stages that read a finished run: the final MLP stage on a single split (single_split) and on a K-fold run
(cross_validation), and the explanation scores (explanation_scores)."""
