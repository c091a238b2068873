"""The kws HTTP service (FastAPI): `kws serve` runs `app.main.create_app`."""
