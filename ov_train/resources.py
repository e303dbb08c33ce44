"""What ships inside the package: the Hydra configs and the data recipes (found the same way from a checkout
and from an installed wheel, so `ov-train` runs from any directory)."""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR / "conf"
RECIPE_DIR = PACKAGE_DIR / "data_recipes"
