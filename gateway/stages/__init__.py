"""Pipeline stages: each is ``async def __call__(ctx) -> Decision | None``."""
