"""Write a small synthetic dataset laid out exactly like the BreaKHis tree (common/data/demo.py), for trying the
pipeline without the real data. Its images are not tissue: models trained on them say nothing about BreaKHis.

    python make_demo_data.py demo_data --patients-per-class 4 --images-per-patient 6
    python make_demo_data.py /tmp/d1 --patients-per-class 4 --images-per-patient 3 --magnifications 40 \
        --width 64 --height 48
"""


from common.core.console import CommandParser
from common.core.errors import run_main
from common.data.demo import make_demo_dataset


def main() -> None:
    parser = CommandParser(description=__doc__)
    parser.add_argument("out_dir", help="where the BreaKHis_v1 tree is written")
    parser.add_argument("--patients-per-class", type=int, default=4, help="patients per class (benign, malignant)")
    parser.add_argument("--images-per-patient", type=int, default=6, help="images per patient and magnification")
    parser.add_argument("--magnifications", default="40,100,200,400", help="comma-separated magnifications")
    parser.add_argument("--width", type=int, default=96, help="image width in pixels")
    parser.add_argument("--height", type=int, default=64, help="image height in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seeds the whole dataset (same seed, same images)")
    args = parser.parse_args()
    root = make_demo_dataset(args.out_dir, patients_per_class=args.patients_per_class,
                             images_per_patient=args.images_per_patient,
                             magnifications=tuple(args.magnifications.split(",")), width=args.width,
                             height=args.height, seed=args.seed)
    print(f"demo dataset written to {root}")


if __name__ == "__main__":
    run_main(main)
