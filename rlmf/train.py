"""The Hydra entry point: ``rlmf-train`` / ``python -m rlmf.train``.

Compose the config (schemas in ``rlmf.config``), validate it before any work, run the chosen stages
(``rlmf.pipeline``), and leave in the run directory: ``config_resolved.yaml``, each stage's outputs and checkpoints,
``train.log`` (Hydra's job log), ``summary.json`` and ``reply_rate_by_stage.png``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from rlmf.config import register_configs  # noqa: E402
from rlmf.validate import validate  # noqa: E402

log = logging.getLogger("rlmf")
register_configs()


def print_summary(summary: Dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from rlmf.reporting import STAGE_COLUMNS, stage_table

    console = Console()
    rows = stage_table(summary)
    if rows:
        by_stage = Table(title="Generators on held-out prompts")
        by_stage.add_column("generator")
        for title, _ in STAGE_COLUMNS:
            by_stage.add_column(title, justify="right")
        for row in rows:
            by_stage.add_row(*row)
        console.print(by_stage)
        if "discriminator/accuracy" in summary:
            console.print(f"discriminator held-out pairwise accuracy: {summary['discriminator/accuracy']:.3f}")
    table = Table(title="RLMF run summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(summary):
        value = summary[key]
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def _drop_lightning_tips(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def quiet_libraries() -> None:
    """Keep the console for our progress bars and tables: no per-file load reports or one-off tips."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # One function object, so repeated jobs in a multirun process do not stack filters.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_drop_lightning_tips)


def run_job(cfg: DictConfig, run_dir: Path, sweep_group: str | None = None) -> Dict[str, Any]:
    """Everything the entry point does after composition; callable from tests with a composed config."""
    import lightning as L

    from rlmf.distributed import is_main_process
    from rlmf.files import write_atomic
    from rlmf.kernels import set_default_backend
    from rlmf.pipeline import run_pipeline
    from rlmf.run import Run
    from rlmf.reporting import plot_reply_rates, plot_rounds, round_table

    validate(cfg)
    quiet_libraries()
    main = is_main_process()  # under trainer=ddp, ranks > 0 train beside rank 0 and write nothing of their own
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        write_atomic(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    set_default_backend(cfg.generator.logprob_backend)
    run = Run(cfg=cfg, run_dir=run_dir, sweep_group=sweep_group)
    try:
        summary = run_pipeline(run)
        if main:
            write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
            plot = plot_reply_rates(summary, run_dir / "reply_rate_by_stage.png")
            if plot is not None:
                log.info("plot: %s", plot)
            if cfg.loop.rounds > 1:
                write_atomic(run_dir / "rounds.md", round_table(summary, cfg.loop.rounds) + "\n")
                plot_rounds(summary, cfg.loop.rounds, run_dir / "rounds.png")
                log.info("rounds:\n%s", round_table(summary, cfg.loop.rounds))
            run.log_summary(summary)
    finally:
        run.close()
    return summary


@hydra.main(version_base="1.3", config_path="pkg://rlmf.conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweep_group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    summary = run_job(cfg, run_dir, sweep_group)
    from rlmf.distributed import is_main_process

    if not is_main_process():
        return float("nan")
    print_summary(summary)
    log.info("run directory: %s", run_dir)
    # The objective a Hydra sweeper would optimise: the final gold reply rate, when the run evaluated one.
    rates = [v for k, v in summary.items() if k.startswith("gold/reply_rate/")]
    return float(rates[-1]) if rates else float("nan")


if __name__ == "__main__":
    main()
