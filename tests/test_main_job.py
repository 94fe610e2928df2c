"""The README's main job at its real default sizes (about two minutes on 2 CPU cores): the claim it makes must hold.

Only the logger and the progress bar differ from `make demo`.
"""

from rlmf.train import run_job


def test_default_main_job_aligned_generator_beats_sft(compose, tmp_path):
    summary = run_job(compose("logger=none", "trainer.progress_bar=false"), tmp_path / "run")
    assert summary["sft/val_loss_after"] < summary["sft/val_loss_before"]
    assert summary["gold/reply_rate/sft"] > summary["gold/reply_rate/initial"]
    assert summary["discriminator/accuracy"] > 0.6, "the reward model learned from replies alone"
    assert summary["align/chosen_gold_reply_rate"] > summary["align/rejected_gold_reply_rate"]
    assert summary["gold/reply_rate/aligned"] > summary["gold/reply_rate/sft"]
    assert summary["gold/reply_rate_greedy/aligned"] > summary["gold/reply_rate_greedy/sft"]
    assert 0.0 < summary["kl/aligned"] < 10.0, "alignment moved the policy without collapsing it"
