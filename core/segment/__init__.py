"""Trainable (scribble) segmentation: filters, classifiers, CRF, training labels and evaluation."""
