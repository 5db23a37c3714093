"""Lets test modules import shared helpers from each other (``from test_lopt import ...``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
