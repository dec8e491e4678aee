"""GPU kernels (Triton) behind the plain-torch building blocks; never imported on CPU-only paths."""
