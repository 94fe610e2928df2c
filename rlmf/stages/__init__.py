"""The stages of the main job, one file each: sft -> feedback -> discriminator (and the evaluation's judge) ->
align -> evaluate. Each is a function ``stage_<name>(run) -> metrics`` that reads its inputs through the run
(:class:`rlmf.run.Run`), builds its module from the config (:mod:`rlmf.modules.build`), trains it with
:func:`rlmf.trainer.train_stage` or samples, and writes its outputs under the run's stage directory;
:mod:`rlmf.pipeline` orders and runs them.
"""
