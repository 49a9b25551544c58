"""One `plait train`-like vision run scored on a validation split held out of the training images.

For choosing a recipe without looking at the test images: the last HELD_OUT (287) of the 1,437 digits
training images are never trained on and replace the test split in every evaluation (val_acc in
metrics.csv is then validation top-1); training sees the first 1,150. Everything else (model, engine,
optimizer, schedule, augmentation, logs) is plait's VisionRun unchanged. One process only.

    python benchmarks/vision_heldout.py train configs/vit-digits.toml --set train.lr=4 ...

benchmarks/large_batch_vision.py --select runs its trials through this.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from plait.config import Config, Plan, load_config
from plait.data.images import Augment, ImageLoader, ImageSet, image_eval_batches, load_digits
from plait.distributed.launch import log_file
from plait.train.image_tasks import LOG_FILE, VisionRun, eval_batch_size, summary_line
from plait.train.setup import validate

HELD_OUT = 287  # a fifth of the 1,437 training images


def split_training(train_set: ImageSet, *, held_out: int = HELD_OUT) -> tuple[ImageSet, ImageSet]:
    """(images to train on, the last `held_out` training images for validation)."""
    if not 0 < held_out < len(train_set):
        raise ValueError(f"held_out={held_out}: keep between 1 and {len(train_set) - 1} training images back")
    cut = len(train_set) - held_out
    fit = ImageSet(train_set.images[:cut], train_set.labels[:cut], num_classes=train_set.num_classes)
    held = ImageSet(train_set.images[cut:], train_set.labels[cut:], num_classes=train_set.num_classes)
    return fit, held


class HeldOutRun(VisionRun):
    """VisionRun training on the first 1,150 training images and evaluating on the last 287."""

    def __init__(self, config: Config, *, plan: Plan) -> None:
        super().__init__(config, plan=plan)
        train, task = config.train, config.task
        fit, held = split_training(load_digits(size=task.image_size)[0])
        augment = Augment(max_shift=task.max_shift, max_degrees=task.max_degrees)
        self.loader = ImageLoader(fit, global_batch=train.global_batch, dp_rank=0, dp_size=1, seed=train.seed,
                                  augment=augment)  # fmt: skip
        self.test_batches = image_eval_batches(held, batch_size=eval_batch_size(1), dp_rank=0, dp_size=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train"])
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    if config.task.kind != "image_classification" or config.plan.dp != 1:
        raise SystemExit("vision_heldout.py runs one process of task.kind='image_classification' (plan.dp=1)")
    validated = validate(config, world_size=1)
    with log_file(Path(config.train.out_dir) / LOG_FILE):
        run = HeldOutRun(config, plan=validated.plan)
        try:
            run.log.info(f"done: {summary_line(run.run())} (top-1 on the {HELD_OUT} held-out training images)")
        finally:
            run.engine.close()


if __name__ == "__main__":
    main()
