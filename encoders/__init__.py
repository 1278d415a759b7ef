"""Modality models: one module per modality behind one encoder protocol. No database code here."""

from vectorsync.encoders.base import Encoder, EncodeResult, InputError, load_encoder
from vectorsync.encoders.registry import DEFAULT_ENCODER, ENCODERS, encoder_class

__all__ = [
    "DEFAULT_ENCODER",
    "ENCODERS",
    "EncodeResult",
    "Encoder",
    "InputError",
    "encoder_class",
    "load_encoder",
]
