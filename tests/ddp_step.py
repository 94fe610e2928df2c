"""One optimiser step of the generator, on 1 process with the whole batch or on 2 (DDP, gloo) with half each.

Run by tests/test_distributed.py: ``python tests/ddp_step.py <devices> <format,format,...> <out prefix>``; Lightning's
DDP launcher re-runs this same command for rank 1. For each format, rank 0 saves the (all-reduced) gradients of the
step and the parameters after it to ``<out prefix>-<format>.pt``.
"""

import os
import random
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from rlmf.data import FeedbackExample, PreferencePair, tokenize_feedback, tokenize_pairs  # noqa: E402
from rlmf.data.alignment import AlignmentDataModule, with_mismatched_completions  # noqa: E402
from rlmf.data.collate import FeedbackCollator  # noqa: E402
from rlmf.data.loading import RowsDataModule  # noqa: E402
from rlmf.models import build_tiny_generator, train_tokenizer  # noqa: E402
from rlmf.modules.generator import Generator  # noqa: E402
from rlmf.reference import prepare_reference  # noqa: E402
from rlmf.tasks.persona_email import build_world, compose_email, corpus_texts  # noqa: E402

ROWS = 8  # the global batch: 8 rows on one process, 4 on each of two


class Capture(L.Callback):
    def __init__(self):
        self.grads = None

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.grads = {n: p.grad.detach().clone() for n, p in module.model.named_parameters() if p.grad is not None}


def main(devices: int, fmt: str, out: str) -> None:
    world = build_world(seed=0, num_prospects=40)
    tokenizer = train_tokenizer(corpus_texts(world), vocab_size=300)
    rng = random.Random(0)
    briefs = world.train[:2 * ROWS]
    # Completions of different lengths, so per-rank token counts differ (the SFT normaliser must be global).
    pairs = [PreferencePair(b.prompt, compose_email(b, rng, 1.0), compose_email(b, rng, 0.0)) for b in briefs]
    L.seed_everything(0, verbose=False)
    model = build_tiny_generator(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                 max_position_embeddings=320, seed=0)
    batch_size = ROWS // devices
    if fmt == "paired":
        features = tokenize_pairs(pairs, tokenizer, 192, 96)[0][:ROWS]
        data = AlignmentDataModule(features, [], "paired", tokenizer.pad_token_id, 192, batch_size)
        loss = "dpo"
    elif fmt == "unpaired":
        thumbs = [FeedbackExample(p.prompt, p.chosen if i % 2 else p.rejected, bool(i % 2))
                  for i, p in enumerate(pairs)]
        features = with_mismatched_completions(tokenize_feedback(thumbs, tokenizer, 192, 96)[0][:ROWS], 192)
        data = AlignmentDataModule(features, [], "unpaired", tokenizer.pad_token_id, 192, batch_size)
        loss = "kto"
    else:
        features = tokenize_feedback([FeedbackExample(p.prompt, p.chosen, True) for p in pairs], tokenizer, 192,
                                     96)[0][:ROWS]
        data = RowsDataModule(features, [], FeedbackCollator(tokenizer.pad_token_id), batch_size)
        loss = "sft"
    assert len(features) == ROWS, len(features)
    policy, reference = prepare_reference("frozen" if loss != "sft" else "none", model)
    if loss == "kto":
        # A reference unlike the policy, so KTO's reference point z (the batch KL, clamped at 0) is positive and
        # differs between the two halves of the batch: it must be taken over the global batch.
        with torch.no_grad():
            reference.get_output_embeddings().weight.mul_(3.0)
    module = Generator(policy, loss_name=loss, reference=reference, lr=1e-2, warmup_ratio=0.0,
                       pad_token_id=tokenizer.pad_token_id)
    capture = Capture()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0,
                        use_distributed_sampler=False, callbacks=[capture])
    trainer.fit(module, datamodule=data)
    if trainer.global_rank == 0:
        torch.save({"grads": capture.grads, "params": {n: p.detach().clone() for n, p in module.model.named_parameters()},
                    "world_size": trainer.world_size}, out)


if __name__ == "__main__":
    for data_format in sys.argv[2].split(","):  # one process pair for all formats: starting one costs seconds
        main(int(sys.argv[1]), data_format, f"{sys.argv[3]}-{data_format}.pt")
