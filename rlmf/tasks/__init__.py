"""Tasks: what the pipeline trains on and is judged by (:mod:`rlmf.tasks.base`). Importing the package registers
the built-in ones."""

from rlmf.tasks import persona_email, preference_files  # noqa: F401  (registration side effects)
