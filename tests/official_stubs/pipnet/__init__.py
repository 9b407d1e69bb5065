"""Stand-in for the official PIP-Net package ``pipnet`` (tests only)."""
