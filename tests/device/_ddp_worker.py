"""One rank of a torchrun job for tests/device/test_distributed.py: ``_ddp_worker.py DUMP_DIR -- TRAIN_ARGS``.

Runs ``freezetune train TRAIN_ARGS`` through the CLI, as a user's job would, then writes ``DUMP_DIR/rank<R>.pt``:
the weights and buffers the rank started training from and ended its last epoch with (before the final test loads
``best.pt``), the epochs it ran, its unfreeze events and trainable parameters, its run dir, its final test result and
how many validation images it scored in each validation.

Test hooks (environment): ``STOP_EPOCH`` makes every rank exit as that (0-based) epoch is about to start, as a
preempted job does after its last checkpoint; ``SKEW_RUN_DIR`` gives each rank its own default run dir name, as
ranks reading the clock a second apart would, so only the broadcast of rank 0's choice keeps them together.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(dump: Path, argv: list[str]) -> int:
    import torch

    from freezetune.cache import path as feature_path
    from freezetune.cli.main import main as cli_main
    from freezetune.run import directory as runtime
    from freezetune.training import trainer

    torch.set_num_threads(1)
    record: dict = {"val_scored": []}
    real_fit, real_test, real_run_epoch = trainer.Trainer.fit, trainer.Trainer._final_test, trainer.Trainer._run_epoch
    real_run_dir, stop = runtime.default_run_dir, int(os.environ.get("STOP_EPOCH", "-1"))

    def fit(self):
        record.update(start=_state(self.model), run_dir=str(self.run_dir))
        return real_fit(self)

    def final_test(self, **kwargs):
        unfreezer = self.state.unfreezer
        record.update(end=_state(self.model), epochs=self.progress.epoch, best_epoch=self.progress.best_epoch,
                      events=unfreezer.events if unfreezer else [],
                      trainable=[n for n, p in self.model.named_parameters() if p.requires_grad])  # fmt: skip
        record["test"] = real_test(self, **kwargs)
        torch.save(record, dump / f"rank{self.dist.rank}.pt")
        return record["test"]

    def run_epoch(self, epoch, unfrozen):
        if epoch == stop:
            self.checkpoints.wait()  # "after its last checkpoint": the background writer has put it on disk
            os._exit(0)  # no clean-up, like a kill; 0 so that torchrun does not tear down a rank still saving
        return real_run_epoch(self, epoch, unfrozen)

    real_evaluate = feature_path.evaluate

    def evaluate(module, batches, *args, **kwargs):  # counts the validation images this rank scores
        record["val_scored"].append(0)

        def counted():
            for inputs, targets in batches:
                record["val_scored"][-1] += len(targets)
                yield inputs, targets

        return real_evaluate(module, counted(), *args, **kwargs)

    trainer.Trainer.fit, trainer.Trainer._final_test, trainer.Trainer._run_epoch = fit, final_test, run_epoch
    feature_path.evaluate = evaluate
    if os.environ.get("SKEW_RUN_DIR"):
        runtime.default_run_dir = lambda model: Path(f"{real_run_dir(model)}-rank{os.environ['RANK']}")
    return cli_main(["train", *argv])


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:]))
