"""interpretable-zoo models: create_model, list_models, load_pretrained and the model classes."""
from .backbones import Backbone, ReceptiveField, UnknownBackboneError
from .base import Explanation, InterpretableClassifier, NonFiniteLossError
from .cam import CAMNet
from .plain import PlainClassifier
from .pretrained import (CheckpointError, list_pretrained, load_pretrained, pretrained_entry, read_checkpoint,
                         save_zoo_checkpoint)
from .registry import create_model, is_model, list_models, register_model
from .prototree import ProtoTree, ProtoTreeEnsemble
from .icnn import InterpretableCNN, InterpretableLayer
from .protopnet import ProtoPNet, ProtoPNetEnsemble
from .bcos import BcosNet
from .pipnet import PIPNet
from .protopool import ProtoPool
from .cbm import ConceptBottleneck

__all__ = [
    "Backbone",
    "CheckpointError",
    "list_pretrained",
    "load_pretrained",
    "pretrained_entry",
    "read_checkpoint",
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
    "ProtoTree",
    "ProtoTreeEnsemble",
    "InterpretableCNN",
    "InterpretableLayer",
    "ProtoPNet",
    "ProtoPNetEnsemble",
    "BcosNet",
    "PIPNet",
    "ProtoPool",
    "ConceptBottleneck",
]
