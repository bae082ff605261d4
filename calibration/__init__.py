"""Expert-similarity calibration: compare every pair of experts of every MoE layer on text.

    sere-calibrate --model_path ./model               # or: python -m sere.calibration --help

    from sere.calibration import calibrate, similarity_matrix
    result = calibrate(model, token_ids, method="cka", kernel="linear")   # {layer: E x E}
    sim = similarity_matrix(outputs, "cosine")                            # outputs: E, N, D

Modules: metrics (entry points), cka / pointwise (the metrics and their pairwise-loop
references), experts (MoE layer discovery, all-expert outputs), calibrate (the model pass),
data (text in), report (table, heatmap), loading (device, tokenizer and model checks; the model
read straight onto the device), memory (peak host and device memory), __main__ (the command).
The artifact format is sere.artifact.
"""
from sere.calibration.calibrate import CalibrationError, CalibrationResult, calibrate
from sere.calibration.metrics import KERNELS, METHODS, pairwise_similarity, similarity_matrix

__all__ = [
    "KERNELS",
    "METHODS",
    "CalibrationError",
    "CalibrationResult",
    "calibrate",
    "pairwise_similarity",
    "similarity_matrix",
]
