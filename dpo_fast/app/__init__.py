"""The ``dpo-fast`` command-line app: ``train`` (TRL's DPOTrainer with dpo_fast inside, or the
demo), ``bench`` and ``profile-memory``. See :mod:`dpo_fast.app.cli`."""
