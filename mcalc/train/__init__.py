"""The training driver (layer 6): networks on generated kernels, curvature backprop, optimisers."""
