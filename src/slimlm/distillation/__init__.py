"""Knowledge distillation and recovery fine-tuning (`losses`, `students`, `trainer`, `qat`)."""
