"""What libraries print that is not about the run stays out of it (utils/logging.py tidy_library_output)."""
import warnings

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from ov_train.utils.logging import tidy_library_output

NOTICE = "Using ModelCheckpoint with manual optimization"


class ManualSteps(LightningModule):
    """One linear layer stepped by hand, as ov_train's module steps (training/step.py)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.linear = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(self.linear(batch).pow(2).mean())
        optimizer.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(4, 2), batch_size=2)


def fit_with_step_checkpoints(tmp_path, tidy: bool) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if tidy:
            tidy_library_output()
        trainer = Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                          callbacks=[ModelCheckpoint(tmp_path, every_n_train_steps=1, save_last=True)],
                          default_root_dir=tmp_path, accelerator="cpu")
        trainer.fit(ManualSteps())
    return [str(w.message) for w in caught]


def test_step_checkpoints_under_manual_optimization_print_no_example_code(tmp_path):
    assert any(NOTICE in m for m in fit_with_step_checkpoints(tmp_path / "plain", tidy=False))  # Lightning's own
    assert not any(NOTICE in m for m in fit_with_step_checkpoints(tmp_path / "tidy", tidy=True))
