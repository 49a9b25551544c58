"""A reward model saved by `plait finetune` recipe "reward", read back as PPO's frozen reward
(``[ppo] reward = "model"``, ``reward_path = ".../checkpoints/step-N"``).

The checkpoint holds the RewardModel's whole state (``lm.*`` and ``score_head.*``); its LM is rebuilt
on a copy of the policy's base, so the reward model must share the policy's architecture and tokenizer
(both checked: the tokenizer before launch, the weights' names and shapes before the first collective).
"""

from __future__ import annotations

import copy
from pathlib import Path

from tokenizers import Tokenizer
from torch import nn

from plait.checkpoint.io import MANIFEST_FILE, MODEL_PREFIX, load_checkpoint, open_checkpoint, read_trainer_state
from plait.recipes.base import BaseTokenizer
from plait.recipes.reward import RewardModel

HEAD = "score_head.weight"


def check_reward_checkpoint(path: str | Path, tokenizer: BaseTokenizer) -> None:
    """``path`` is a reward-model checkpoint whose tokenizer is the policy's; else one line saying why."""
    path = Path(path)
    where = f"[ppo] reward_path={str(path)!r}"
    if not path.exists():
        raise ValueError(f'{where} does not exist; give a step-N directory of a recipe.kind="reward" run')
    if not (path / MANIFEST_FILE).is_file():
        raise ValueError(f'{where} is not a plait checkpoint; give a step-N directory of a recipe.kind="reward" run')
    if MODEL_PREFIX + HEAD not in open_checkpoint(path).names(MODEL_PREFIX):
        raise ValueError(f'{where} holds no reward head ({HEAD}); give a checkpoint of a recipe.kind="reward" run')
    saved = read_trainer_state(path).get("tokenizer")
    if not saved or Tokenizer.from_str(saved).to_str() != tokenizer.to_json():
        raise ValueError(f"{where}: its tokenizer differs from base.path's; train the reward model from the same base")


def load_reward_model(path: str | Path, policy: nn.Module, tokenizer: BaseTokenizer) -> RewardModel:
    """The saved reward model on a copy of ``policy``'s architecture, frozen, in eval mode."""
    check_reward_checkpoint(path, tokenizer)
    state, _, _ = load_checkpoint(Path(path))
    model = RewardModel(copy.deepcopy(policy))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise ValueError(
            f"[ppo] reward_path={str(path)!r} does not fit the policy's architecture ({first}); "
            "train the reward model from base.path"
        ) from None
    return model.eval().requires_grad_(False)
