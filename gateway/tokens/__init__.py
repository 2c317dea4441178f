"""The token service: key ring, JWKS, session store and login/refresh/logout policy (no aiohttp)."""
