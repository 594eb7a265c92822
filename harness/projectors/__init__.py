"""Projector families by name. Fitted families need a fit spec (the data and recipe they learn from)."""

from .base import Projector
from .identity import IdentityProjector
from .least_squares import GramAccumulator, LeastSquaresProjector, choose_pair_mode, fit_least_squares

from ..options import FITTED, LEAST_SQUARES
from ..options import PROJECTORS as NAMES

__all__ = ["FITTED", "LEAST_SQUARES", "NAMES", "GramAccumulator", "IdentityProjector", "LeastSquaresProjector", "Projector",
           "choose_pair_mode", "fit_least_squares"]
