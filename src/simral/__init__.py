"""simral: regional tele-imaging platform (archive, teleradiology, sharing, DMP)."""

__version__ = "0.1.0"
