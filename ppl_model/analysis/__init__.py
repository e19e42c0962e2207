"""Analyses of trained detectors: Few-Patch-Bias measurement by counterfactual patch masking (``cde``)."""
