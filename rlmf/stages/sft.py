"""The sft stage: the starting generator (a fresh tiny Llama, or a ``generator=hf`` checkpoint) fine-tuned on the
task's demonstrations; writes ``initial/`` (the untrained generator) and ``generator/``."""

from __future__ import annotations

from typing import Any, Dict

from rlmf.data import log_data_report
from rlmf.data.sft import SFTDataModule, sft_rows
from rlmf.distributed import is_main_process
from rlmf.logprobs_check import check_logprobs_match_forward
from rlmf.models import build_tiny_generator, save_generator, train_tokenizer
from rlmf.modules.build import build_sft_generator
from rlmf.run import Run
from rlmf.trainer import optimiser_steps, train_stage


def initial_generator(run: Run):
    """The untrained starting point: a fresh tiny Llama with a tokenizer trained on the task, or an HF model (loaded
    and checked like every generator, :meth:`Run.load_generator`)."""
    g = run.cfg.generator
    if g.kind == "hf":
        return run.load_generator(g.name_or_path)
    tokenizer = train_tokenizer(run.task.corpus(), vocab_size=g.tiny.vocab_size)
    model = build_tiny_generator(tokenizer, hidden_size=g.tiny.hidden_size, num_layers=g.tiny.num_layers,
                                 num_heads=g.tiny.num_heads, intermediate_size=g.tiny.intermediate_size,
                                 max_position_embeddings=g.tiny.max_position_embeddings, seed=run.cfg.seed)
    check_logprobs_match_forward(model)
    return model, tokenizer


def stage_sft(run: Run) -> Dict[str, Any]:
    """SFT on ``task.demonstrations``; reports the validation loss before and after (``sft/val_loss_*``)."""
    out = run.stage_dir("sft")
    model, tokenizer = initial_generator(run)
    if is_main_process():
        save_generator(model, tokenizer, out / "initial")
    g, opt = run.cfg.generator, run.cfg.generator.sft
    train, validation = run.task.demonstrations("train"), run.task.demonstrations("validation")
    data = SFTDataModule(train, validation, tokenizer,
                         batch_size=opt.batch_size, max_length=g.max_length, max_prompt_length=g.max_prompt_length,
                         seed=run.cfg.seed, num_workers=run.cfg.trainer.num_workers, max_tokens=opt.max_tokens)
    module = build_sft_generator(run.cfg, model)
    log_data_report("SFT data", sft_rows(train), tokenizer, data.drops)
    steps = optimiser_steps(run, opt, data.batches_per_epoch(opt.max_epochs or 1))

    def validation_loss(trainer) -> float:
        return trainer.validate(module, datamodule=data, verbose=False)[0]["sft/val/loss"]

    return train_stage(
        run, "sft", module, data, steps,
        measure_before=lambda trainer: {"sft/val_loss_before": validation_loss(trainer)},
        measure=lambda trainer: {"sft/val_loss_after": validation_loss(trainer), "sft/steps": steps,
                                 "sft/train_examples": len(data.train_rows)},
        save=lambda out: save_generator(module.model, tokenizer, out / "generator"))
