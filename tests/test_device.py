"""``device = "auto"`` (every torch encoder's default) picks the CPU when torch sees no GPU, and an
explicit ``device = "cuda"`` without one is one clear error naming the embedding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from vectorsync.encoders.base import DeviceError, resolve_device
from vectorsync.encoders.params import PARAMS
from vectorsync.encoders.tabular import TabularAutoencoder
from vectorsync.errors import VectorsyncError

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="these check the machine without a GPU")

TORCH_ENCODERS = ["autoencoder", "conv_autoencoder", "identity_cnn", "lstm", "minilm", "sentence_transformer"]


def test_every_torch_encoder_defaults_to_auto():
    for name in TORCH_ENCODERS:
        assert PARAMS[name].model_fields["device"].default == "auto", name
    assert "device" not in PARAMS["dlib"].model_fields  # dlib does not run on torch


@no_gpu
def test_auto_trains_and_encodes_on_the_cpu():
    assert resolve_device("auto") == "cpu"
    encoder = TabularAutoencoder(4, ["a", "b"], {"epochs": 1})
    assert encoder.device == "cpu"
    frame = pd.DataFrame({"a": np.arange(64.0), "b": np.arange(64.0) % 7})
    encoder.fit(lambda: iter([frame]))
    assert next(encoder.model.parameters()).device.type == "cpu"
    assert encoder.encode(frame).vectors.shape == (64, 4)


def test_a_device_that_is_not_a_torch_device_is_refused_when_the_spec_loads():
    with pytest.raises(VectorsyncError, match="device"):
        TabularAutoencoder(4, ["a"], {"device": "gpu"})


@no_gpu
def test_cuda_without_a_gpu_is_one_error_naming_the_embedding(write_config, cli, conn):
    conn.execute("CREATE TABLE items (id int PRIMARY KEY, a real, b real)")
    conn.execute("INSERT INTO items SELECT g, g, g % 7 FROM generate_series(1, 50) g")
    config = write_config(
        """
        [[embeddings]]
        name = "items"
        table = "items"
        key = "id"
        modality = "tabular"
        dim = 4
        columns = ["a", "b"]
        encoder = { type = "autoencoder", epochs = 1, device = "cuda" }
        """
    )
    assert cli("migrate", config=config).code == 0
    result = cli("train", "items", config=config)
    assert result.code == 1
    message = (result.out + result.err).strip()
    assert "'items'" in message and "device = 'cuda'" in message and "no CUDA GPU" in message
    assert "Traceback" not in message
    with pytest.raises(DeviceError, match=r"^embedding 'items': device = 'cuda' but torch sees no CUDA GPU"):
        from vectorsync.sync.models import new_encoder
        from vectorsync.sync.spec import load_config

        new_encoder(load_config(config).select(["items"])[0])
