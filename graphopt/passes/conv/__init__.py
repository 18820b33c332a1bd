"""Convolution algorithms: Winograd minimal filtering for 3x3 stride-1 convs (winograd.py), with
its Cook-Toom matrices (winograd_transforms.py)."""
