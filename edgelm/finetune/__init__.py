"""Fine-tuning after distillation: PEFT LoRA adapters (or a full fine-tune) on the distillation trainer."""
