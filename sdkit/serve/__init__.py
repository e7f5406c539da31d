"""`sdkit serve`: a model on KServe's own Python model server (v1 and v2 REST), parsing requests
with the same code, caps and errors as the TorchServe handler (sdkit/export/handler*.py)."""
