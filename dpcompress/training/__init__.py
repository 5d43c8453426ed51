"""Training: data, fine-tuning with the plan applied, and the distributed helpers."""
