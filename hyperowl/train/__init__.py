"""Training: recipes (recipe.py), JSONL data (data.py), parameter groups (optim.py), LoRA (lora.py),
upgrading a text LLM (upgrade.py), the loop with DDP/FSDP2 and exact resume (trainer.py), plots (plot.py)."""
