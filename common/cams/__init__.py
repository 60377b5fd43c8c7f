"""Class activation maps: Grad-CAM, Grad-CAM++ and LayerCAM in one forward pass and the one vocabulary of their
names (methods), the reference hooks-and-backward Grad-CAM that tests compare against (reference), the heatmap
file of a model (heatmap_file), and maps as pictures (display)."""
