"""Thin HTTP handlers the gateway serves itself: /auth/*, JWKS, health, sign-in pages."""
