"""Shared code of the BreaKHis pipeline: data and splits, transforms, models, training, Grad-CAM, metrics.

Sections, one module each, in pipeline order:
    common.data          index a dataset into records; patient-level splits; the split file
    common.demo          synthetic BreaKHis-like demo data
    common.transforms    train/eval transforms (PIL per image, and batched on the device)
    common.dataset       batches on the device: plain DataLoader path or decoded-image cache
    common.models        the models table (one entry per CNN: constructor, weights, head, Grad-CAM layer,
                         script, forward split at that layer) and weights loading
    common.runtime       device, torchrun (DDP), mixed precision and memory format, seeding, the optimizer
    common.runfiles      the run folder's file names and the decision threshold, for writers and readers
    common.checkpoints   what fine_tuned_<arch>.pth holds; reading one back safely
    common.train         the shared fine-tuning loop (train_one_epoch, evaluate, fit, resume)
    common.cam           Grad-CAM at the cost of one forward pass
    common.cam_methods   Grad-CAM++ and LayerCAM from the same pass; their arrays in the heatmap file
    common.heatmaps      heatmap export (heatmaps_<arch>.npz: every CAM method of one pass) and overlays
    common.metrics       image- and patient-level metrics
    common.model_script  a model script from start to end: split, cache, fit, export, test metrics
    common.cli           the model scripts' one argument parser
    common.fusion        the final stage: heatmap alignment, features, the MLP
    common.cam_comparison  the final MLP on Grad-CAM vs Grad-CAM++ vs LayerCAM maps: intervals, paired differences
    common.crossval      patient-level K-fold, fold files, cross-fitted stacking
    common.foldrun       a model script's run of one fold (--folds K --fold k) in fold_<k>/
    common.cv            a K-fold run's aggregation: out-of-fold set, cross-fitted stackers, cv_results.*
    common.cv_report     the cross-validation report page
    common.cv_predict    predict.py on a K-fold run: bagged fold models, the out-of-fold MLP
    common.stats         patient-level diagnosis, vectorised patient bootstrap, paired differences
    common.faithfulness  deletion/insertion AUC of saliency maps against random and Gaussian baselines
    common.attribution   LIME, Kernel SHAP, occlusion (captum); Integrated Gradients shares of the final MLP
    common.explain       one image explained by every method side by side (faithfulness figures, predict --explain)
    common.faithfulness_run  the faithfulness command (python -m common.faithfulness --output-dir RUN)
    common.report        the static HTML report of a run
    common.report_faithfulness  its interpretability section, from faithfulness.json
    common.inference     new images through a finished run's models: the one path of predict.py and the viewer
    common.viewer        the browser viewer's functions (app.py is its Gradio page)
    common.console       what the scripts show on the console: --help layout, progress of long loops
    common.fileio        atomic writes of every result file; leftovers of killed runs; full disks
    common.errors        the one-line error that scripts print instead of a traceback
    common.reference_cam the hooks + full-backward Grad-CAM that tests and benchmarks compare against
"""
