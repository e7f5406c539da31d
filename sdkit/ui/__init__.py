"""`sdkit ui`: a Gradio page to generate with several models side by side and watch training runs.

app (the page and its server), generate_tab / generation (one column per model, through
sdkit.inference), models (the kept pipelines), runs_tab / runs (a run folder's curves and samples).
"""
