"""Fine-tune an ImageNet-pretrained DenseNet-121 to classify BreaKHis images as benign (0) or malignant (1).

    python cancer_class_densenet_121.py --data-dir /path/to/BreaKHis_v1 --output-dir runs/breakhis
    python cancer_class_densenet_121.py --data-dir demo_data --output-dir runs/demo --weights none --image-size 64 \
        --epochs 2
    torchrun --nproc_per_node=4 cancer_class_densenet_121.py --data-dir /path/to/BreaKHis_v1 --output-dir runs/breakhis

Writes to --output-dir: split.json (if it is the first script there), fine_tuned_densenet121.pth (best epoch by
val), train_log_densenet121.jsonl, heatmaps_densenet121.npz (Grad-CAM at `relu(features.norm5)`, 7x7 at 224 px, for
every image), metrics_densenet121.json (val and test) and overlays/densenet121/*.png. The head `classifier` is
replaced by a 2-class layer.
Everything but the defaults below lives in common/ (see common/training/model_script.py).
"""

from common.core.errors import run_main
from common.training.model_script import run_model_script

ARCH = "densenet121"
DEFAULTS = dict(lr=1e-4, batch_size=32)


def main() -> None:
    run_model_script(arch=ARCH, description=__doc__, **DEFAULTS)


if __name__ == "__main__":
    run_main(main)
