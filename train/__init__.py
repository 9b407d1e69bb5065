"""Training-side code: datasets and DataModules (``train.data``), the SyntheticParts generator
(``train.synthetic``) and training callbacks."""
