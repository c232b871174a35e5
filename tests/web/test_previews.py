"""PreviewEncoder: step previews encoded on a thread of their own, from copies, all delivered by close().
The CUDA test runs on a GPU machine (scripts/gpu_check.sh), not in CI."""

import threading

import numpy as np
import pytest
import torch

from web.previews import PreviewEncoder, encode_preview


def collecting():
    delivered, threads = [], []

    def deliver(frame: bytes) -> None:
        threads.append(threading.current_thread())
        delivered.append(frame)

    return delivered, threads, deliver


def test_previews_are_encoded_off_the_sampling_thread_from_a_copy():
    delivered, threads, deliver = collecting()
    encoder = PreviewEncoder(deliver)
    latents = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    expected = [encode_preview(latent[:1]) for latent in latents]
    for latent in latents:
        encoder.submit(latent)
        latent.zero_()  # the sampler reusing its buffer must not change the preview
    encoder.close()  # waits for every frame
    assert delivered == expected and threading.current_thread() not in threads
    encoder.submit(np.zeros((1, 4, 8, 8), dtype=np.float32))  # numpy values too; a closed encoder restarts
    encoder.close()
    assert len(delivered) == 4


@pytest.mark.cuda
def test_a_cuda_latent_is_copied_without_waiting_and_encoded_the_same():
    delivered, threads, deliver = collecting()
    encoder = PreviewEncoder(deliver)
    latent = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    on_gpu = latent.cuda()
    encoder.submit(on_gpu)
    on_gpu.zero_()  # queued after the copy on the same stream: the preview keeps the values
    encoder.close()
    assert delivered == [encode_preview(latent[:1])]
