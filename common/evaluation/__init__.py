"""Numbers about predictions: image- and patient-level metrics (metrics), patient-level diagnosis, the patient
bootstrap and paired differences (stats), and the final MLP on each map type compared (map_comparison)."""
