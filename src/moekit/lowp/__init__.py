"""Low-precision training (docs/low_precision.md): number formats (formats.py: FP8, E2M1, scaled FP8;
mx.py: OCP MX block formats), the random Hadamard transform (hadamard.py), the recipes and their
quantised GEMMs (recipes.py, matmul.py; scaled.py runs FP8 ones through torch._scaled_mm), and the model
transform (transform.py: apply_precision)."""
