"""Runtime (layer 6): curvature blocks, array backends and the loader of generated code."""
