"""Held-out evaluation: the conditions a trained policy is compared with, their statistics, the confirmation ledger."""
