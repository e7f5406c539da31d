"""Exports: safetensors (diffusers folders, single-file checkpoints, LoRA files) and TorchServe archives.

Kept free of imports so `import sdkit.export.run` stays cheap; each writer imports torch itself.
"""
