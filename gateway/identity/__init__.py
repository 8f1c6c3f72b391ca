"""Who is calling: gateway-issued API keys and JWTs from external identity providers."""
