"""interpretable-zoo models: create_model, list_models and the model classes."""
from .backbones import Backbone, ReceptiveField, UnknownBackboneError
from .base import Explanation, InterpretableClassifier, NonFiniteLossError
from .cam import CAMNet
from .plain import PlainClassifier
from .pretrained import CheckpointError, list_pretrained, load_pretrained, save_zoo_checkpoint
from .registry import create_model, is_model, list_models, register_model
from .prototree import ProtoTree, ProtoTreeEnsemble

__all__ = [
    "Backbone",
    "CheckpointError",
    "list_pretrained",
    "load_pretrained",
    "save_zoo_checkpoint",
    "CAMNet",
    "PlainClassifier",
    "Explanation",
    "InterpretableClassifier",
    "NonFiniteLossError",
    "ReceptiveField",
    "UnknownBackboneError",
    "create_model",
    "is_model",
    "list_models",
    "register_model",
]
__all__ += ["ProtoTree", "ProtoTreeEnsemble"]
from .icnn import InterpretableCNN, InterpretableLayer  # noqa: E402
__all__ += ["InterpretableCNN", "InterpretableLayer"]
from .protopnet import ProtoPNet, ProtoPNetEnsemble  # noqa: E402
__all__ += ["ProtoPNet", "ProtoPNetEnsemble"]
