"""Fine-tune an ImageNet-pretrained ResNet-50 to classify BreaKHis images as benign (0) or malignant (1).

    python cancer_class_resnet_50.py --data-dir /path/to/BreaKHis_v1 --output-dir runs/breakhis
    python cancer_class_resnet_50.py --data-dir demo_data --output-dir runs/demo --weights none --image-size 64 \
        --epochs 2
    torchrun --nproc_per_node=4 cancer_class_resnet_50.py --data-dir /path/to/BreaKHis_v1 --output-dir runs/breakhis

Writes to --output-dir: split.json (if it is the first script there), fine_tuned_resnet50.pth (best epoch by val),
train_log_resnet50.jsonl, heatmaps_resnet50.npz (Grad-CAM at `layer4`, 7x7 at 224 px, for every image),
metrics_resnet50.json (val and test) and overlays/resnet50/*.png. The head `fc` is replaced by a 2-class layer.
Everything but the defaults below lives in common/ (see common/training/model_script.py).
"""

from common.core.errors import run_main
from common.training.model_script import run_model_script

ARCH = "resnet50"
DEFAULTS = dict(lr=1e-4, batch_size=32)


def main() -> None:
    run_model_script(arch=ARCH, description=__doc__, **DEFAULTS)


if __name__ == "__main__":
    run_main(main)
