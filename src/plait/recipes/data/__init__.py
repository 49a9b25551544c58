"""Data for the fine-tuning recipes: one module per recipe (instruction pairs, preference pairs, images)."""
