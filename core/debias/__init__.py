"""Debiasing: projection heads (RASA and baselines) and the ALiBi/NoPE retrofit trainer."""
