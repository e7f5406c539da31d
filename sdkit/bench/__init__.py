"""`sdkit bench`: times the trainer's public step, and a plain diffusers loop as the reference."""
