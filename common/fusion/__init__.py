"""The final classifier: the three CNNs' maps as features (features), the heatmap MLP, its training and its file
(mlp), and stackers cross-fitted on out-of-fold rows (stacking)."""
