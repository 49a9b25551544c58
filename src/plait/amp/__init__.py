"""Mixed precision: the precision policy (param/reduce/master dtypes) and the loss scaler."""

from plait.amp.policy import PrecisionPolicy
from plait.amp.scaler import LossScaler, Overflow

__all__ = ["LossScaler", "Overflow", "PrecisionPolicy"]
