"""Train the DeepSeek-V3-family reference MoE: ``train_moe.py --arch deepseek_v3`` (kept for the commands recorded in
RESULTS.md).

    python benchmarks/models/train_deepseek.py --minutes 28 --out ~/.cache/routealign/models/tiny-deepseek_v3
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_moe import main  # noqa: E402

if __name__ == "__main__":
    main(default_arch="deepseek_v3")
