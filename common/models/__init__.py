"""The CNNs: one table entry per architecture with its constructor, weights, head and Grad-CAM layer (registry),
and what a fine-tuned checkpoint holds and how it is read back safely (checkpoints)."""
