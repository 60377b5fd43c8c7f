"""Explanations beyond the CAMs and how faithful they are: LIME, Kernel SHAP, occlusion and Integrated Gradients
through captum (attribution), deletion/insertion AUC against baselines (faithfulness), and one image explained by
every method side by side (figures)."""
