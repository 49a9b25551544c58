"""[task]: what a run trains for."""

from __future__ import annotations

from dataclasses import dataclass

from plait.config.choices import TASKS, require


@dataclass
class TaskConfig:
    """What a run trains for. ``causal_lm`` (the default): next-token prediction on [data]'s corpus.
    ``image_classification``: a ViT or Swin preset ([model] preset vit-* / swin-*) on scikit-learn's
    8x8 digits upsampled to image_size, with a random shift and rotation per sample::

        [task]
        kind = "image_classification"
        image_size = 32

    On the corpus (plait.tasks): ``masked_lm`` (BERT presets: mask_prob of each sample, 80/10/10),
    ``masked_lm_sop`` (ALBERT: plus sentence-order prediction), ``span_corruption`` (T5: noise_density,
    mean_span).
    """

    kind: str = "causal_lm"
    image_size: int = 32  # image_classification: the digits are upsampled to image_size x image_size
    max_shift: float = 3.0  # augmentation: pixels of random shift either way (0: none)
    max_degrees: float = 10.0  # augmentation: degrees of random rotation either way (0: none)
    mask_prob: float = 0.15  # masked_lm(_sop): the fraction of each sample's tokens predicted
    whole_word: bool = False  # masked_lm: predict whole words (tokens joined by word characters) up to mask_prob
    noise_density: float = 0.15  # span_corruption: the fraction of tokens in noise spans
    mean_span: float = 3.0  # span_corruption: the mean noise span length

    def __post_init__(self) -> None:
        require(self.kind in TASKS, f"task.kind={self.kind!r}: choose one of {', '.join(TASKS)}")
        require(self.image_size >= 8, f"task.image_size={self.image_size}: the digits are 8x8; use 8 or more")
        require(
            self.max_shift >= 0 and self.max_degrees >= 0,
            f"task.max_shift={self.max_shift}, task.max_degrees={self.max_degrees}: use non-negative values "
            "(0 switches that augmentation off)",
        )
        require(
            0 < self.mask_prob < 1 and 0 < self.noise_density < 1 and self.mean_span >= 1,
            f"task.mask_prob={self.mask_prob}, task.noise_density={self.noise_density}, task.mean_span="
            f"{self.mean_span}: use fractions in (0, 1) and a mean span >= 1 (BERT and T5: 0.15, 0.15, 3)",
        )
        require(
            not self.whole_word or self.kind == "masked_lm",
            f"task.whole_word masks whole words for task.kind='masked_lm' (BERT), not {self.kind!r}; drop it",
        )

    @property
    def uses_corpus(self) -> bool:
        """Whether the task reads [data]'s text corpus (image classification has its own images)."""
        return self.kind != "image_classification"
