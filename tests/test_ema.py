"""The EMA callback: Lightning's EMAWeightAveraging restricted to trainable parameters."""

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging

from meta_vqa.callbacks import EMA


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(3, 3).requires_grad_(False)
        self.head = torch.nn.Linear(3, 1)
        self.register_buffer("stat", torch.zeros(1))

    def training_step(self, batch, batch_idx):
        self.stat += 1  # a buffer that changes: the average keeps the model's value
        x, y = batch
        return torch.nn.functional.mse_loss(self.head(self.frozen(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


class _Record(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.seen.append([p.detach().clone() for p in pl_module.head.parameters()])


def _fit(callback):
    torch.manual_seed(0)
    model, rec = _Tiny(), _Record()
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(20, 3), torch.randn(20, 1)), 4
    )
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[rec, callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    return model, rec.seen, callback._average_model.module


def test_ema_of_trainable_parameters_matches_a_hand_computation_and_lightnings():
    decay = 0.5
    model, seen, avg = _fit(EMA(decay=decay))
    expected = seen[0]  # the first update copies, later ones move towards the new weights
    for step in seen[1:]:
        expected = [decay * e + (1 - decay) * p for e, p in zip(expected, step)]
    for a, e in zip(avg.head.parameters(), expected):
        torch.testing.assert_close(a, e)
    for a, p in zip(avg.frozen.parameters(), model.frozen.parameters()):
        assert torch.equal(a, p)
    assert avg.stat.item() == model.stat.item() == 5
    _, _, stock = _fit(EMAWeightAveraging(decay=decay))
    for a, b in zip(avg.head.parameters(), stock.head.parameters()):
        torch.testing.assert_close(a, b)
