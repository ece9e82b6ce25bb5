"""Weights & Biases for a sweep (optional: `pip install nanoserve[lab]`): one run per point, with
the point's grid values as config and its measurements as summary, grouped under the sweep's
name, then a summary run with the results table and the plots. `WANDB_MODE=offline` writes the
runs under <run dir>/wandb/ for a later `wandb sync`."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from server.lab.sweep import PointResult


class SweepLogger:
    def __init__(self, project: str, group: str, run_dir: Path):
        try:
            import wandb
        except ImportError as error:
            raise RuntimeError("--wandb needs the wandb package: pip install 'nanoserve[lab]'") from error
        self.wandb, self.project, self.group, self.dir = wandb, project, group, str(run_dir)

    def log_point(self, result: PointResult) -> None:
        run = self.wandb.init(project=self.project, group=self.group, name=result.point.label, job_type="point",
                              dir=self.dir, config={**asdict(result.point), "status": result.status}, reinit="finish_previous")
        if result.status == "ok":
            run.log(result.metrics)
        run.summary.update({"status": result.status, "reason": result.reason, **result.metrics})
        run.finish()

    def log_summary(self, rows: list[dict], columns: list[str], plots: list[Path]) -> None:
        run = self.wandb.init(project=self.project, group=self.group, name=f"{self.group} summary", job_type="summary",
                              dir=self.dir, reinit="finish_previous")
        table = self.wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        run.log({"results": table, **{p.stem: self.wandb.Image(str(p)) for p in plots}})
        run.finish()
