"""Training: supervised fine-tuning with TRL + PEFT, and its callbacks."""
