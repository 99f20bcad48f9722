"""Dense numeric evaluation and the finite-difference oracle."""
from .evaluate import Evaluator, commutation_matrix, unvec, vec
from .finite_diff import fd_hbp, fd_jacobian, fd_second_order, hessian_fd, jacobian_fd

__all__ = [
    "Evaluator", "commutation_matrix", "fd_hbp", "fd_jacobian", "fd_second_order", "hessian_fd",
    "jacobian_fd", "unvec", "vec",
]
