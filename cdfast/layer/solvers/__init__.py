"""The layer solvers: ``adam`` and ``sgd`` (:mod:`.iterative`), ``exact`` (:mod:`.exact`)."""
from .exact import exact_solve, solve_on_support
from .shared import SelectionPiece, pieces_of, select_shared_channels
from .iterative import ITERATIVE_SOLVERS, SolverConfig, data_iterative, gram_iterative, run_iterative

SOLVERS = ITERATIVE_SOLVERS + ("exact",)

__all__ = ["SOLVERS", "SolverConfig", "run_iterative", "gram_iterative", "data_iterative", "exact_solve",
           "solve_on_support", "SelectionPiece", "pieces_of", "select_shared_channels"]
