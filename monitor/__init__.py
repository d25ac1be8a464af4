"""Protocol-compliance monitor for clinical trials (first protocol: ANACOMP, NCT04656184)."""

__version__ = "0.1.0"
