"""Projector families by name. ``FITTED`` families need least-squares statistics of a fit corpus."""

from .base import Projector
from .identity import IdentityProjector
from .least_squares import GramAccumulator, LeastSquaresProjector, choose_pair_mode, fit_least_squares

NAMES = ("id", "mat", "affine")
FITTED = {"mat": False, "affine": True}  # name -> with intercept

__all__ = ["FITTED", "NAMES", "GramAccumulator", "IdentityProjector", "LeastSquaresProjector", "Projector",
           "choose_pair_mode", "fit_least_squares"]
