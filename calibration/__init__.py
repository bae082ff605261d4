"""Expert-similarity calibration."""
