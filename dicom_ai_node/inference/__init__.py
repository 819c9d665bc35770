"""Inference: turn a complete series into a volume and a model's segmentation."""
