"""Inference: the job queue, and turning a complete series into a volume and a model's segmentation."""
