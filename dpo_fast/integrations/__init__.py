"""Integrations with training frameworks. Each submodule imports its framework, so import the
one you use: ``dpo_fast.integrations.trl`` (TRL's ``DPOTrainer``)."""
