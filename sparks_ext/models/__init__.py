"""Binary networks parameterised by the conv type: ``conv="float" | "binary" | "sparks"``."""
from .common import CONV_TYPES, BasicBlock, make_conv
from .resnet import BinaryResNet, resnet18
from .small import SmallCNN

__all__ = ["CONV_TYPES", "BasicBlock", "make_conv", "BinaryResNet", "resnet18", "SmallCNN"]
