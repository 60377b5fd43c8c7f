"""Fine-tune an ImageNet-pretrained VGG-16 to classify BreaKHis images as benign (0) or malignant (1).

    python cancer_class_vgg_16.py --data-dir /path/to/BreaKHis_v1 --output-dir runs/breakhis
    python cancer_class_vgg_16.py --data-dir demo_data --output-dir runs/demo --weights none --image-size 64 --epochs 2
    torchrun --nproc_per_node=4 cancer_class_vgg_16.py --data-dir /path/to/BreaKHis_v1 --output-dir runs/breakhis

Writes to --output-dir: split.json (if it is the first script there), fine_tuned_vgg16.pth (best epoch by val),
train_log_vgg16.jsonl, heatmaps_vgg16.npz (Grad-CAM at `features[29]`, 14x14 at 224 px, for every image),
metrics_vgg16.json (val and test) and overlays/vgg16/*.png. The head `classifier[6]` is replaced by a 2-class layer.
Everything but the defaults below lives in common/ (see common/training/model_script.py).
"""

from common.core.errors import run_main
from common.training.model_script import run_model_script

ARCH = "vgg16"
DEFAULTS = dict(lr=5e-5, batch_size=32)  # VGG-16 has no batch norm: a smaller step is stabler


def main() -> None:
    run_model_script(arch=ARCH, description=__doc__, **DEFAULTS)


if __name__ == "__main__":
    run_main(main)
