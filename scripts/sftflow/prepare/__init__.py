"""Data preparation: generated solutions -> filtered, formatted SFT rows (NeMo-Skills prepare_data parity)."""
