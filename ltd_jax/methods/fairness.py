"""Robust-fairness baselines of the ABSLD tables: Fair-ARD / Fair-RSLAD (Yue et al. 2023) and
BAT (Sun et al. 2023)."""

from __future__ import annotations
