"""Training objectives: what a run minimises, one module each (sft.py); base.py says what they share."""
