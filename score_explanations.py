"""How faithful are a finished run's explanations? Deletion and insertion AUC of every explanation method of every
CNN on a fixed sample of test images, against the random and centred-Gaussian baselines; the combined map against
the soft vote; and what the final MLP looks at (common/stages/explanation_scores.py).

    python score_explanations.py --output-dir runs/breakhis [--images 100 --steps 16 --seed 0]
"""

from common.core.errors import run_main
from common.stages.explanation_scores import main

if __name__ == "__main__":
    run_main(main)
