"""Maps encoder type names (as written in specs) to their classes, imported lazily."""

from __future__ import annotations

import importlib

from encoders.base import Encoder

#: type name -> "module:Class"; modules are imported only when used (torch start-up is slow).
ENCODERS: dict[str, str] = {
    "autoencoder": "encoders.tabular:TabularAutoencoder",
    "conv_autoencoder": "encoders.image:ConvAutoencoder",
    "identity_cnn": "encoders.face:IdentityCNN",
    "dlib": "encoders.face:DlibFaceEncoder",
    "lstm": "encoders.text:LSTMTextEncoder",
    "minilm": "encoders.minilm:MiniLMEncoder",
    "sentence_transformer": "encoders.minilm:SentenceTransformerFolder",
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
