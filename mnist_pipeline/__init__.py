"""Shared code of the MNIST pipeline: params, IDX data, model, losses, training and tracking."""
