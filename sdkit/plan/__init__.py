"""`sdkit plan`: peak GPU memory of the trainer's own step, traced on fake tensors from configs."""
