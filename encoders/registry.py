"""Maps encoder type names (as written in specs) to their classes, imported lazily."""

from __future__ import annotations

import importlib

from vectorsync.encoders.base import Encoder

#: type name -> "module:Class"; modules are imported only when used (torch start-up is slow).
ENCODERS: dict[str, str] = {
    "autoencoder": "vectorsync.encoders.tabular:TabularAutoencoder",
    "conv_autoencoder": "vectorsync.encoders.image:ConvAutoencoder",
    "identity_cnn": "vectorsync.encoders.face:IdentityCNN",
    "dlib": "vectorsync.encoders.face:DlibFaceEncoder",
    "lstm": "vectorsync.encoders.text:LSTMTextEncoder",
    "minilm": "vectorsync.encoders.minilm:MiniLMEncoder",
    "sentence_transformer": "vectorsync.encoders.minilm:SentenceTransformerFolder",
    "graphsage": "vectorsync.encoders.graphsage:GraphSAGEEncoder",
}

#: The encoder each modality uses when the spec names none.
DEFAULT_ENCODER: dict[str, str] = {
    "tabular": "autoencoder",
    "image": "conv_autoencoder",
    "face": "identity_cnn",
    "text": "lstm",
}


def encoder_class(type_name: str) -> type[Encoder]:
    try:
        target = ENCODERS[type_name]
    except KeyError:
        known = ", ".join(sorted(ENCODERS))
        raise ValueError(f"unknown encoder type {type_name!r}; known types: {known}") from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
