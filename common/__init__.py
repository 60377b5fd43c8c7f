"""Shared code of the BreaKHis pipeline: data and splits, transforms, models, training, Grad-CAM, metrics.

Sections, one module each:
    common.data        index a dataset into records; patient-level splits; the split file
    common.demo        synthetic BreaKHis-like demo data
    common.transforms  train/eval transforms (PIL per image, and batched on the device)
    common.dataset     batches on the device: plain DataLoader path or decoded-image cache
    common.models      architecture table, weights loading, forward split at the Grad-CAM layer
    common.cam         Grad-CAM at the cost of one forward pass
    common.heatmaps    heatmap export (heatmaps_<arch>.npz) and overlays
    common.metrics     image- and patient-level metrics
    common.train       the shared fine-tuning loop (single process or torchrun) and checkpoints
    common.cli         the model scripts' one argument parser
    common.console     what the scripts show on the console: --help layout, progress of long loops
    common.fusion      the final stage: heatmap alignment, features, the MLP
    common.report      the static HTML report of a run
    common.fileio      atomic writes of every result file
    common.errors      the one-line error that scripts print instead of a traceback
"""
