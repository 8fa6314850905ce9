"""The stateline HTTP service (FastAPI): ``create_app(db)`` and the key store behind its API keys."""

from stateline.api.app import ApiSettings, create_app
from stateline.api.auth import ApiKey, KeyStore, Principal

__all__ = ["ApiKey", "ApiSettings", "KeyStore", "Principal", "create_app"]
