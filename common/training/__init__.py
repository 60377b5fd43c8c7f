"""Fine-tuning the CNNs: where the work runs, device, torchrun/DDP, mixed precision (runtime), the model scripts'
options (config), the loop (loop), and a model script from start to end, every fold of a K-fold run included
(model_script)."""
