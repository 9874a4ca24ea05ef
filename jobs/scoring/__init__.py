"""Scoring: answer extraction, verifiers, reward functions, and the filter that keeps an SFT set."""
