"""Sizes for people. Imports nothing (the CLI's fast commands use it)."""


def human_size(n: float) -> str:
    """1536 -> '1.5 KiB' (powers of 1024)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
