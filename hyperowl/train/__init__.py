"""Training: recipes (recipe.py), JSONL data (data.py), tokenizers (tokenizer.py), the starting model and its
processor (build.py), parameter groups and the optimizer (optim.py), LoRA (lora.py), the loss (losses.py),
checkpoints and resume (checkpointing.py), upgrading a text LLM (upgrade.py), the loop with DDP/FSDP2 and
phases (trainer.py), plots (plot.py)."""
