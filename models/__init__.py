"""The model seam: requests in, responses out, plus a fingerprint."""

from treesynth.models.base import Model, ModelError, Request, Response

__all__ = ["Model", "ModelError", "Request", "Response"]
