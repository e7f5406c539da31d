"""Inference: model references and loading, sampling, `sdkit generate` and `sdkit eval`."""
