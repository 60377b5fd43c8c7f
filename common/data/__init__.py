"""The data stage: a dataset indexed into records (records), the patient-level split and K folds, each made once
into its file and verified by every later reader (partition), images decoded, cached and batched (images), the
train and eval transforms (transforms), and the synthetic BreaKHis-like demo data (demo)."""
