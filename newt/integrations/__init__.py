"""Glue for training frameworks whose loops call ``optimizer.step()`` themselves.

Each module imports its framework on import, so ``import newt`` never needs them:
:mod:`newt.integrations.huggingface` for the Hugging Face ``Trainer``. PyTorch Lightning needs
no glue: its automatic optimization passes a closure, so ``Newt`` runs in lookahead mode.
"""
