"""The BreaKHis pipeline's code, arranged by pipeline stage. The top-level scripts are the commands; this package
is what they share. Its parts, in layer order (lowest first):

    core        the one-line errors, atomic writes, console output, the run folder's file names
    data        records of a dataset, the patient-level split and folds, decoding and batching images,
                transforms, the synthetic demo data
    models      the models table (one entry per CNN), building and loading them, checkpoints
    cams        Grad-CAM, Grad-CAM++ and LayerCAM in one pass, the heatmap file, maps as pictures
    evaluation  metrics, the patient bootstrap, the map-type comparison
    training    where the work runs (device, DDP, AMP), the options of the model scripts, the fine-tuning loop,
                the model script from start to end
    fusion      the final classifier's features, the MLP and its file, cross-fitted stacking
    explain     captum's perturbation methods, the faithfulness metric, explanation figures
    run         the one loader of a finished run, whatever its kind (single split or K-fold)
    inference   new images through a finished run's models (predict.py, the viewer)
    stages      the stages that read a run: the final MLP stage (single split, K-fold), explanation scores
    report      the static HTML report of a run
    viewer      the browser viewer's functions (app.py is its page)

A module imports only from its own layer or the layers below it (tests/test_layers.py parses every import,
those inside functions too, and also refuses import cycles); a lower layer that needs something from above takes it
as an argument.
"""

LAYERS = ("core", "data", "models", "cams", "evaluation", "training", "fusion", "explain", "run", "inference",
          "stages", "report", "viewer")

# Before anything heavy is imported: a stage that run_pipeline.py started stays quiet on a Ctrl-C that arrives
# while it is still importing (torch takes seconds), as it does inside run_main; the driver's line speaks for it.
from common.core.errors import quiet_interrupts_in_a_pipeline_stage  # noqa: E402

quiet_interrupts_in_a_pipeline_stage()
