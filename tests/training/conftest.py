"""pytest setup for the training tests: one CPU thread, since the tiny models gain nothing from more."""

import torch


def pytest_configure() -> None:
    torch.set_num_threads(1)
