"""rtgateway: a room-based WebSocket gateway that stays bounded under load."""

__all__ = ["__version__"]

__version__ = "0.1.0"
